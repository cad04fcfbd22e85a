"""Command line, modelled on qemu-storage-daemon so one can stand in for the other.

qmpd --socket PATH [--object secret,id=s0,data=PW] [--blockdev ...]
     [--nbd-server addr.type=unix,addr.path=NBD] [--export type=nbd,id=e0,node-name=N]
qmpd --chardev socket,id=c0,path=PATH,server=on,wait=off --monitor chardev=c0[,pretty=on]
qmpd --chardev socket,id=c0,fd=N,server=on,wait=off --monitor chardev=c0   (an inherited socket)
qmpd --chardev socket,id=c0,host=H,port=P,server=on,wait=off --monitor chardev=c0   (TCP)
LISTEN_PID=... LISTEN_FDS=N [LISTEN_FDNAMES=a:b] qmpd ...   (systemd socket activation)
qmpd --daemonize --pidfile PATH ...
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import trio

from qmpd import QEMU_VERSION, __version__, keyval, listeners, systemd
from qmpd.daemonize import Foreground, StartupReport, daemonize
from qmpd.listeners import FdAddress, InetAddress, MonitorSpec, UnixAddress

PROG = "qmpd"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="A QMP daemon that manages the keys of LUKS block images "
        "(raw LUKS and LUKS in qcow2), compatible with qemu-storage-daemon.",
    )
    parser.add_argument(
        "--socket",
        metavar="PATH",
        action="append",
        default=[],
        help="listen for QMP clients on this Unix socket (repeatable)",
    )
    parser.add_argument(
        "--chardev",
        metavar="socket,id=ID,path=PATH|fd=N|host=H,port=P[,server=on,wait=off]",
        action="append",
        default=[],
        help="qemu-storage-daemon style socket: a path, an inherited listening "
        "socket (fd=N, or a LISTEN_FDNAMES name) or TCP; pair it with "
        "--monitor",
    )
    parser.add_argument(
        "--monitor",
        metavar="chardev=ID[,pretty=on]",
        action="append",
        default=[],
        help="serve QMP on a --chardev (qemu-storage-daemon style)",
    )
    parser.add_argument(
        "--object",
        metavar="secret,id=ID,data=...|file=...[,format=base64]",
        action=InOrder,
        dest="startup",
        default=[],
        help="create an object at start-up (repeatable; keyval or JSON)",
    )
    parser.add_argument(
        "--blockdev",
        metavar="OPTIONS",
        action=InOrder,
        dest="startup",
        help="open a block node at start-up (repeatable; keyval or JSON)",
    )
    parser.add_argument(
        "--nbd-server",
        metavar="addr.type=unix,addr.path=PATH|addr.type=inet,addr.host=H,addr.port=N",
        action=InOrder,
        dest="startup",
        help="start the NBD server (as nbd-server-start)",
    )
    parser.add_argument(
        "--export",
        metavar="type=nbd,id=ID,node-name=N[,name=E][,writable=on]",
        action=InOrder,
        dest="startup",
        help="export a node over NBD at start-up (as block-export-add)",
    )
    parser.add_argument(
        "--pidfile", metavar="PATH", help="write the pid here once the sockets accept connections"
    )
    parser.add_argument(
        "--daemonize",
        action="store_true",
        help="detach once every monitor and export accepts connections (exit "
        "0), or print the start-up error and exit 1",
    )
    parser.add_argument(
        "--schema",
        metavar="DIR",
        type=Path,
        help="load the API from this schema directory (default: the bundled one)",
    )
    parser.add_argument(
        "--log-level",
        default=None,
        choices=["debug", "info", "warning", "error", "critical"],
        help="log to stderr from this level up (default: warning; given, "
        "--daemonize keeps stderr open for the log)",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"{PROG} {__version__} (QMP of QEMU {'.'.join(map(str, QEMU_VERSION))})",
    )
    return parser


class InOrder(argparse.Action):
    """Collect the start-up options as (option, text) in command-line order:
    qsd creates objects, nodes, the NBD server and exports in the order given."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        items = list(getattr(namespace, self.dest) or [])
        items.append((option_string.lstrip("-"), values))
        setattr(namespace, self.dest, items)


class UsageError(Exception):
    pass


#: QemuOpts' booleans (qapi/opts-visitor, util/qemu-option.c parse_option_bool).
_TRUE, _FALSE = ("on", "yes", "true", "y"), ("off", "no", "false", "n")
#: Chardev options QEMU knows (any backend's); qmpd implements the first set.
_CHARDEV_USED = {
    "backend",
    "id",
    "path",
    "fd",
    "host",
    "port",
    "to",
    "ipv4",
    "ipv6",
    "server",
    "wait",
    "nodelay",
    "delay",
    "abstract",
    "tight",
}
_CHARDEV_UNSUPPORTED = {
    "localaddr",
    "localport",
    "reconnect",
    "telnet",
    "tn3270",
    "websocket",
    "tls-creds",
    "tls-authz",
    "mux",
    "logfile",
    "logappend",
    "width",
    "height",
    "chardev",
    "signal",
    "name",
    "debug",
    "size",
    "mouse",
    "clipboard",
    "cols",
    "rows",
}


def _bool(options: dict, key: str, default: bool | None = None) -> bool | None:
    value = options.get(key)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if str(value) in _TRUE:
        return True
    if str(value) in _FALSE:
        return False
    raise UsageError(f"Parameter '{key}' expects 'on' or 'off'")


def _chardev(text: str) -> tuple[str, listeners.Address]:
    """One --chardev: its id and where it listens (qemu_chr_parse_socket's checks)."""
    try:
        options = keyval.parse(text, implied_key="backend")
    except keyval.KeyvalError as exc:
        raise UsageError(str(exc)) from None
    for key in options:
        if key not in _CHARDEV_USED | _CHARDEV_UNSUPPORTED:
            raise UsageError(f"Invalid parameter '{key}'")
    if "id" not in options:
        raise UsageError("chardev: no id specified")
    if options.get("backend") != "socket":
        raise UsageError(f"qmpd offers only socket chardevs, not '{options.get('backend')}'")
    for key in options:
        if key in _CHARDEV_UNSUPPORTED:
            raise UsageError(f"qmpd does not support the chardev option '{key}'")
    given = [key for key in ("path", "fd", "host") if key in options]
    if len(given) > 1:
        raise UsageError("None or one of 'path', 'fd' or 'host' option required.")
    if not _bool(options, "server", True):
        raise UsageError("qmpd only listens (server=on)")
    _bool(options, "wait")  # checked; qmpd never waits for a first client
    for key in ("nodelay", "delay", "ipv4", "ipv6", "abstract", "tight"):
        _bool(options, key)
    if not given:
        raise UsageError("chardev: socket: give path=PATH, fd=N or host=H,port=P")
    if given[0] == "path":
        return options["id"], UnixAddress(
            str(options["path"]),
            abstract=bool(_bool(options, "abstract", False)),
            tight=bool(_bool(options, "tight", True)),
        )
    if given[0] == "fd":
        return options["id"], FdAddress(str(options["fd"]))
    if "port" not in options:
        raise UsageError("chardev: socket: no port given")
    to = options.get("to")
    if to is not None:
        try:
            to = int(to)
        except ValueError:
            raise UsageError("Parameter 'to' expects a number") from None
    return options["id"], InetAddress(
        host=str(options["host"]),
        port=str(options["port"]),
        to=to,
        ipv4=_bool(options, "ipv4"),
        ipv6=_bool(options, "ipv6"),
    )


def _claimed_by_nbd(args: argparse.Namespace) -> set[str]:
    """The ``addr.str`` texts of ``--nbd-server addr.type=fd`` (not monitors, then)."""
    texts = set()
    for option, text in args.startup:
        if option != "nbd-server":
            continue
        try:
            addr = keyval.parse(text).get("addr") or {}
        except keyval.KeyvalError:
            continue  # reported, with its text, when the item runs
        if isinstance(addr, dict) and addr.get("type") == "fd" and "str" in addr:
            texts.add(str(addr["str"]))
    return texts


def monitor_specs(
    args: argparse.Namespace, activation: systemd.Activation | None = None
) -> list[MonitorSpec]:
    """Every QMP monitor the command line (and socket activation) asks for.

    Sockets systemd passed that neither a ``--chardev fd=`` nor an
    ``--nbd-server addr.type=fd`` takes (by number or by name) are monitors too.
    """
    specs = [MonitorSpec(UnixAddress(path)) for path in args.socket]
    chardevs: dict[str, tuple[str, listeners.Address]] = {}
    for text in args.chardev:
        try:
            chardev_id, address = _chardev(text)
        except UsageError as exc:
            raise UsageError(f"--chardev {text}: {exc}") from None
        if chardev_id in chardevs:
            raise UsageError(f"--chardev {text}: duplicate yank instance")
        chardevs[chardev_id] = (text, address)
    used: set[str] = set()
    for text in args.monitor:
        try:
            try:
                options = keyval.parse(text, implied_key="chardev")
            except keyval.KeyvalError as exc:
                raise UsageError(str(exc)) from None
            for key in options:
                if key not in ("chardev", "mode", "pretty", "id"):
                    raise UsageError(f"Invalid parameter '{key}'")
            if "chardev" not in options:
                raise UsageError("Parameter 'chardev' is missing")
            if options.get("mode", "control") != "control":
                raise UsageError("Only QMP is supported")
            pretty = bool(_bool(options, "pretty", False))
            name = options["chardev"]
            if name not in chardevs:
                raise UsageError(f'chardev "{name}" not found')
            if name in used:
                raise UsageError(f"Device '{name}' is in use")
        except UsageError as exc:
            raise UsageError(f"--monitor {text}: {exc}") from None
        used.add(name)
        origin, address = chardevs[name]
        specs.append(MonitorSpec(address, pretty=pretty, origin=f"--chardev {origin}"))
    if activation is not None:
        taken: set[int] = set()
        named = activation.by_name()
        for text in [s.address.text for s in specs if isinstance(s.address, FdAddress)] + sorted(
            _claimed_by_nbd(args)
        ):
            if text in named:
                taken.update(named[text])
            else:
                try:
                    taken.add(listeners.parse_fd(text))
                except listeners.ListenerError:
                    pass  # reported when it is opened
        for fd in activation.fds:
            if fd not in taken:
                specs.append(
                    MonitorSpec(
                        FdAddress(str(fd)),
                        origin=(f"LISTEN_FDS socket {fd} (name '{activation.name_of(fd)}')"),
                    )
                )
    if not specs:
        raise UsageError(
            "no QMP socket: give --socket PATH (or --chardev + --monitor, or "
            "start qmpd by socket activation)"
        )
    return specs


def _options(daemon, text: str, command: str, to_arguments=lambda options: options) -> dict:
    """keyval or JSON text, coerced and validated as the arguments of ``command``."""
    options = keyval.parse(text)
    return keyval.coerce(
        options, lambda o: daemon.schema.validate_arguments(command, to_arguments(o))
    )


def _nbd_server_arguments(options: dict) -> dict:
    """--nbd-server's flat NbdServerOptions as nbd-server-start's arguments."""
    addr = dict(options.get("addr") or {})
    legacy = {"type": addr.pop("type", None), "data": addr}
    return {**options, "addr": legacy}


async def _startup(daemon, args: argparse.Namespace) -> None:
    """Create the --object, --blockdev, --nbd-server and --export items in order;
    an error names its option, as qsd's do (``--blockdev TEXT: why``)."""
    from qmpd.errors import QMPError

    for option, text in args.startup:
        if option == "object":  # its text may hold a secret: never echoed
            await _startup_item(daemon, option, text)
            continue
        try:
            await _startup_item(daemon, option, text)
        except QMPError as exc:
            raise QMPError(exc.error_class, f"--{option} {text}: {exc.desc}") from None
        except keyval.KeyvalError as exc:
            raise keyval.KeyvalError(f"--{option} {text}: {exc}") from None


async def _startup_item(daemon, option: str, text: str) -> None:
    from qmpd.block import blockdev
    from qmpd.commands.objects import object_from_cli

    if option == "object":
        await object_from_cli(daemon, text)
    elif option == "blockdev":
        await blockdev.add(daemon.nodes, _options(daemon, text, "blockdev-add"))
    elif option == "nbd-server":
        server = _options(daemon, text, "nbd-server-start", _nbd_server_arguments)
        await daemon.exports.start_server(
            server["addr"],
            tls_creds=server.get("tls-creds"),
            tls_authz=server.get("tls-authz"),
            max_connections=server.get("max-connections", 100),
        )
    else:
        await daemon.exports.add(_options(daemon, text, "block-export-add"))


async def _main(
    args: argparse.Namespace,
    specs: list[MonitorSpec],
    report: StartupReport,
    notifier: systemd.Notifier | None = None,
) -> int:
    # Imported here so that --help and --version answer without loading the daemon.
    from qmpd.commands import BindingError
    from qmpd.daemon import Daemon
    from qmpd.errors import QMPError
    from qmpd.qmp.server import ServerError
    from qmpd.schema import Schema, SchemaError

    try:
        daemon = Daemon(Schema.load(args.schema))
    except (SchemaError, BindingError) as exc:  # a broken schema directory or install
        report.failed(f"{PROG}: {exc}")
        return 1

    def ready() -> None:
        if notifier is not None:
            lines = ["READY=1", "STATUS=accepting connections"]
            if args.daemonize:
                lines.append(f"MAINPID={os.getpid()}")
            notifier.notify(*lines)
        report.ready()

    def stopping() -> None:
        if notifier is not None:
            notifier.notify("STOPPING=1", "STATUS=shutting down")

    try:
        await daemon.serve(
            specs,
            pidfile=args.pidfile,
            startup=lambda: _startup(daemon, args),
            ready=ready,
            stopping=stopping,
        )
    except (QMPError, keyval.KeyvalError, ServerError) as exc:
        report.failed(f"{PROG}: {getattr(exc, 'desc', exc)}")
        await daemon.close()
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=(args.log_level or "warning").upper(),
        format=f"{PROG}: %(levelname)s: %(name)s: %(message)s",
    )
    try:
        # Read before --daemonize forks: LISTEN_PID names this process.
        activation = systemd.listen_fds()
    except systemd.ActivationError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    notifier = systemd.Notifier.from_environ()
    if activation is not None:
        listeners.register_names(activation.by_name())
    try:
        specs = monitor_specs(args, activation)
    except UsageError as exc:
        if str(exc).startswith("no QMP socket"):
            parser.print_usage(sys.stderr)
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    report: StartupReport = Foreground()
    if args.daemonize:
        report = daemonize(keep_stderr=args.log_level is not None)
    return trio.run(_main, args, specs, report, notifier)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
