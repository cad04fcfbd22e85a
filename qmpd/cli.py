"""Command line, modelled on qemu-storage-daemon so one can stand in for the other.

    qmpd --socket PATH [--object secret,id=s0,data=PW] [--blockdev ...]
         [--nbd-server addr.type=unix,addr.path=NBD] [--export type=nbd,id=e0,node-name=N]
    qmpd --chardev socket,id=c0,path=PATH,server=on,wait=off --monitor chardev=c0
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import trio

from qmpd import QEMU_VERSION, __version__, keyval

PROG = "qmpd"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="A QMP daemon that manages the keys of LUKS block images "
                    "(raw LUKS and LUKS in qcow2), compatible with qemu-storage-daemon.")
    parser.add_argument("--socket", metavar="PATH", action="append", default=[],
                        help="listen for QMP clients on this Unix socket (repeatable)")
    parser.add_argument("--chardev", metavar="socket,id=ID,path=PATH[,server=on,wait=off]",
                        action="append", default=[],
                        help="qemu-storage-daemon style socket; pair it with --monitor")
    parser.add_argument("--monitor", metavar="chardev=ID", action="append", default=[],
                        help="serve QMP on a --chardev (qemu-storage-daemon style)")
    parser.add_argument("--object", metavar="secret,id=ID,data=...|file=...[,format=base64]",
                        action=InOrder, dest="startup", default=[],
                        help="create an object at start-up (repeatable; keyval or JSON)")
    parser.add_argument("--blockdev", metavar="OPTIONS", action=InOrder, dest="startup",
                        help="open a block node at start-up (repeatable; keyval or JSON)")
    parser.add_argument("--nbd-server", metavar="addr.type=unix,addr.path=PATH|"
                        "addr.type=inet,addr.host=H,addr.port=N", action=InOrder, dest="startup",
                        help="start the NBD server (as nbd-server-start)")
    parser.add_argument("--export", metavar="type=nbd,id=ID,node-name=N[,name=E][,writable=on]",
                        action=InOrder, dest="startup",
                        help="export a node over NBD at start-up (as block-export-add)")
    parser.add_argument("--pidfile", metavar="PATH",
                        help="write the pid here once the sockets accept connections")
    parser.add_argument("--schema", metavar="DIR", type=Path,
                        help="load the API from this schema directory (default: the bundled one)")
    parser.add_argument("--log-level", default="warning",
                        choices=["debug", "info", "warning", "error", "critical"],
                        help="log to stderr from this level up (default: warning)")
    parser.add_argument("--version", action="version",
                        version=f"{PROG} {__version__} (QMP of QEMU "
                                f"{'.'.join(map(str, QEMU_VERSION))})")
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


def socket_paths(args: argparse.Namespace) -> list[str]:
    paths = list(args.socket)
    chardevs: dict[str, str] = {}
    for text in args.chardev:
        try:
            options = keyval.parse(text, implied_key="backend")
        except keyval.KeyvalError as exc:
            raise UsageError(str(exc)) from None
        if options.get("backend") != "socket" or "path" not in options or "id" not in options:
            raise UsageError(f"--chardev '{text}': only 'socket,id=ID,path=PATH' is supported")
        if options.get("server", "on") not in ("on", "yes", "true"):
            raise UsageError("--chardev: qmpd only listens (server=on)")
        chardevs[options["id"]] = options["path"]
    for text in args.monitor:
        try:
            options = keyval.parse(text, implied_key="chardev")
        except keyval.KeyvalError as exc:
            raise UsageError(str(exc)) from None
        if options.get("mode", "control") != "control":
            raise UsageError("--monitor: only mode=control (QMP) is supported")
        if options.get("chardev") not in chardevs:
            raise UsageError(f"chardev \"{options.get('chardev')}\" not found")
        paths.append(chardevs[options["chardev"]])
    if not paths:
        raise UsageError("no QMP socket: give --socket PATH (or --chardev + --monitor)")
    return paths


def _options(daemon, text: str, command: str, to_arguments=lambda options: options) -> dict:
    """keyval or JSON text, coerced and validated as the arguments of ``command``."""
    options = keyval.parse(text)
    return keyval.coerce(options, lambda o: daemon.schema.validate_arguments(
        command, to_arguments(o)))


def _nbd_server_arguments(options: dict) -> dict:
    """--nbd-server's flat NbdServerOptions as nbd-server-start's arguments."""
    addr = dict(options.get("addr") or {})
    legacy = {"type": addr.pop("type", None), "data": addr}
    return {**options, "addr": legacy}


async def _startup(daemon, args: argparse.Namespace) -> None:
    """Create the --object, --blockdev, --nbd-server and --export items in order."""
    from qmpd.block import blockdev
    from qmpd.commands.objects import object_from_cli

    for option, text in args.startup:
        if option == "object":
            await object_from_cli(daemon, text)
        elif option == "blockdev":
            await blockdev.add(daemon.nodes, _options(daemon, text, "blockdev-add"))
        elif option == "nbd-server":
            server = _options(daemon, text, "nbd-server-start", _nbd_server_arguments)
            await daemon.exports.start_server(
                server["addr"], tls_creds=server.get("tls-creds"),
                tls_authz=server.get("tls-authz"),
                max_connections=server.get("max-connections", 100))
        else:
            await daemon.exports.add(_options(daemon, text, "block-export-add"))


async def _main(args: argparse.Namespace, paths: list[str]) -> int:
    # Imported here so that --help and --version answer without loading the daemon.
    from qmpd.commands import BindingError
    from qmpd.daemon import Daemon
    from qmpd.errors import QMPError
    from qmpd.qmp.server import ServerError
    from qmpd.schema import Schema, SchemaError

    try:
        daemon = Daemon(Schema.load(args.schema))
    except (SchemaError, BindingError) as exc:  # a broken schema directory or install
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    try:
        await daemon.serve(paths, pidfile=args.pidfile, startup=lambda: _startup(daemon, args))
    except (QMPError, keyval.KeyvalError, ServerError) as exc:
        print(f"{PROG}: {getattr(exc, 'desc', exc)}", file=sys.stderr)
        await daemon.close()
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format=f"{PROG}: %(levelname)s: %(name)s: %(message)s")
    try:
        paths = socket_paths(args)
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    return trio.run(_main, args, paths)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
