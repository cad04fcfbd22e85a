"""The pieces of stack integration, in process: descriptor checks, systemd's
environment and notifications, the monitor options, QEMU's pretty layout."""

from __future__ import annotations

import argparse
import json
import os
import socket

import pytest
import trio

from qmpd import cli, listeners, systemd
from qmpd.listeners import FdAddress, InetAddress, ListenerError, UnixAddress
from qmpd.qmp.pretty import encode_pretty
from qmpd.qmp.wire import encode_message

# -- descriptor numbers and checks ------------------------------------------------------------

@pytest.mark.parametrize("text, value", [("3", 3), ("+3", 3), (" 3", 3), ("03", 3), ("-1", -1),
                                         ("2147483647", 2147483647)])
def test_fd_numbers_parse_as_qemu_strtoi(text, value) -> None:
    assert listeners.parse_fd(text) == value


@pytest.mark.parametrize("text, message", [
    ("abc", "Unable to parse FD number abc"),
    ("3 ", "Unable to parse FD number 3 "),
    ("0x3", "Unable to parse FD number 0x3"),
    ("", "Unable to parse FD number "),
    ("3_0", "Unable to parse FD number 3_0"),
    ("99999999999", "Unable to parse FD number 99999999999: Numerical result out of range"),
])
def test_fd_numbers_refused_as_qemu_does(text, message) -> None:
    with pytest.raises(ListenerError) as info:
        listeners.parse_fd(text)
    assert str(info.value) == message


def test_a_listening_socket_is_taken_over_once(tmp_path) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(tmp_path / "s"))
    sock.listen()
    fd = sock.fileno()
    taken = listeners.check_listening(fd)
    try:
        assert taken.fileno() == fd and not os.get_inheritable(fd)
        with pytest.raises(ListenerError, match="already in use"):
            listeners.check_listening(fd)
    finally:
        sock.detach()     # ``taken`` owns it now
        taken.close()
    again = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)   # likely the same number
    again.bind(str(tmp_path / "t"))
    again.listen()
    try:
        listeners.check_listening(again.fileno()).detach()   # free once its owner closed
    finally:
        again.close()


def test_refusals_leave_the_descriptor_open(tmp_path) -> None:
    cases = [
        (socket.socket(socket.AF_UNIX, socket.SOCK_STREAM),
         "Failed to listen on fd socket: Invalid argument"),
        (socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM),
         "Failed to listen on fd socket: Operation not supported"),
        (socket.socket(socket.AF_INET, socket.SOCK_STREAM), "is not a listening socket"),
        (socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET), "is not a stream socket"),
    ]
    for sock, message in cases:
        with pytest.raises(ListenerError, match=message):
            listeners.check_listening(sock.fileno())
        os.fstat(sock.fileno())    # still open: the launcher owns it
        sock.close()
    with open(tmp_path / "f", "w") as f:
        with pytest.raises(ListenerError, match=f"File descriptor '{f.fileno()}' is not a "
                                                "socket"):
            listeners.check_listening(f.fileno())


def test_names_select_descriptors() -> None:
    listeners.register_names({"unit-test-name": [97, 98]})
    assert listeners.resolve_fd("unit-test-name") == [97, 98]
    assert listeners.resolve_fd("97") == [97]


# -- systemd's environment ----------------------------------------------------------------------

def test_listen_fds_for_another_process_is_ignored_and_removed() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b", "OTHER": "x"}
    assert systemd.listen_fds(env, pid=1234) is None
    assert env == {"OTHER": "x"}


def test_listen_fds_absent() -> None:
    assert systemd.listen_fds({}, pid=1) is None


@pytest.mark.parametrize("env, message", [
    ({"LISTEN_PID": "7", "LISTEN_FDS": "two"}, "LISTEN_FDS: not a number of sockets: 'two'"),
    ({"LISTEN_PID": "7", "LISTEN_FDS": "-1"}, "LISTEN_FDS: not a number of sockets: '-1'"),
    ({"LISTEN_PID": "7", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "a:b"},
     "LISTEN_FDNAMES has 2 names for 1 sockets"),
    ({"LISTEN_PID": "x", "LISTEN_FDS": "1"}, "LISTEN_PID: not a process id: 'x'"),
])
def test_listen_fds_errors(env, message) -> None:
    with pytest.raises(systemd.ActivationError) as info:
        systemd.listen_fds(env, pid=7)
    assert str(info.value) == message


def test_activation_names() -> None:
    act = systemd.Activation((3, 4, 5), ("qmp", "nbd", "qmp"))
    assert act.by_name() == {"qmp": [3, 5], "nbd": [4]}
    assert act.name_of(4) == "nbd"


@pytest.mark.parametrize("abstract", [False, True])
def test_notifier_sends_one_datagram(tmp_path, abstract) -> None:
    address = f"@qmpd-unit-{os.getpid()}" if abstract else str(tmp_path / "n")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind("\0" + address[1:] if abstract else address)
    env = {"NOTIFY_SOCKET": address}
    notifier = systemd.Notifier.from_environ(env)
    assert env == {} and notifier is not None
    assert notifier.notify("READY=1", "STATUS=ok")
    assert receiver.recv(100) == b"READY=1\nSTATUS=ok"
    receiver.close()


def test_notifier_failure_is_only_logged(tmp_path, caplog) -> None:
    notifier = systemd.Notifier(str(tmp_path / "nobody"))
    assert not notifier.notify("READY=1")
    assert "sd_notify" in caplog.text
    assert systemd.Notifier.from_environ({"NOTIFY_SOCKET": "vsock:2:1"}) is None


# -- the monitor options ---------------------------------------------------------------------

def specs(*argv: str, activation=None):
    args = cli.build_parser().parse_args(list(argv))
    return cli.monitor_specs(args, activation)


def test_chardev_spellings() -> None:
    got = specs("--socket", "/a",
                "--chardev", "socket,id=u,path=/b,server=on,wait=off", "--monitor", "u",
                "--chardev", "socket,id=f,fd=7,server=on,wait=off",
                "--monitor", "chardev=f,pretty=on",
                "--chardev", "socket,id=t,host=::1,port=4444,to=4450,ipv6=on,server=on,wait=off",
                "--monitor", "chardev=t,mode=control")
    assert [(s.address, s.pretty) for s in got] == [
        (UnixAddress("/a"), False), (UnixAddress("/b"), False), (FdAddress("7"), True),
        (InetAddress("::1", "4444", to=4450, ipv6=True), False)]
    assert got[2].origin == "--chardev socket,id=f,fd=7,server=on,wait=off"
    assert got[3].address.socket_address() == {"type": "inet", "host": "::1", "port": "4444",
                                               "to": 4450, "ipv6": True}


@pytest.mark.parametrize("argv, message", [
    (["--chardev", "socket,id=m,tls-creds=t,path=/x", "--monitor", "m"],
     "qmpd does not support the chardev option 'tls-creds'"),
    (["--chardev", "pty,id=m", "--monitor", "m"], "qmpd offers only socket chardevs, not 'pty'"),
    (["--chardev", "socket,id=m,server=on", "--monitor", "m"],
     "chardev: socket: give path=PATH, fd=N or host=H,port=P"),
    (["--chardev", "socket,id=m,path=/x,server=off", "--monitor", "m"],
     "qmpd only listens (server=on)"),
    (["--chardev", "socket,id=m,path=/x", "--monitor", "chardev=m,bogus=1"],
     "Invalid parameter 'bogus'"),
    ([], "no QMP socket"),
])
def test_chardev_and_monitor_refusals(argv, message) -> None:
    with pytest.raises(cli.UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        specs(*argv)


def test_activated_sockets_not_claimed_become_monitors() -> None:
    act = systemd.Activation((3, 4, 5, 6), ("ctl", "nbd", "extra", "extra"))
    got = specs("--chardev", "socket,id=c,fd=ctl,server=on,wait=off",
                "--monitor", "chardev=c,pretty=on",
                "--nbd-server", "addr.type=fd,addr.str=nbd", activation=act)
    assert [(s.address, s.pretty) for s in got] == [
        (FdAddress("ctl"), True), (FdAddress("5"), False), (FdAddress("6"), False)]
    assert got[1].origin == "LISTEN_FDS socket 5 (name 'extra')"
    # by number, too
    got = specs("--nbd-server", '{"addr": {"type": "fd", "str": "3"}}',
                activation=systemd.Activation((3, 4), ("unknown", "unknown")))
    assert [s.address for s in got] == [FdAddress("4")]


# -- pretty=on ---------------------------------------------------------------------------------

def test_pretty_layout() -> None:
    assert encode_pretty({"return": {}}) == b'{\r\n    "return": {\r\n    }\r\n}\r\n'
    assert encode_pretty({"return": []}) == b'{\r\n    "return": [\r\n    ]\r\n}\r\n'
    assert encode_pretty({"a": [1, "\u00e9\n", None, True, 0.5]}) == (
        b'{\r\n    "a": [\r\n        1,\r\n        "\\u00E9\\n",\r\n        null,\r\n'
        b'        true,\r\n        0.5\r\n    ]\r\n}\r\n')


def test_pretty_is_compact_reindented() -> None:
    message = {"return": {"b": [{"x": 1, "y": {"z": []}}], "a": "s", "c": {}}, "id": [1, {}]}
    compact = encode_message(message).decode()
    pretty = encode_pretty(message).decode()
    assert json.loads(pretty) == json.loads(compact)
    # same members in the same (QDict) order
    assert json.loads(pretty, object_pairs_hook=list) == json.loads(compact,
                                                                   object_pairs_hook=list)


def test_pretty_deep_nesting_needs_no_recursion() -> None:
    value: object = []
    for _ in range(1100):
        value = [value]
    out = encode_pretty({"id": value})
    assert out.count(b"[") == 1101 and out.endswith(b"}\r\n")


# -- Daemon.serve with listeners the caller made -------------------------------------------

async def test_serve_takes_ready_made_listeners_and_calls_back(tmp_path) -> None:
    from qmpd.daemon import Daemon
    from qmpd.listeners import MonitorSpec

    calls = []
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    daemon = Daemon()
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: daemon.serve(
            [MonitorSpec(listener, pretty=True), str(tmp_path / "q.sock")],
            pidfile=str(tmp_path / "pid"), ready=lambda: calls.append("ready"),
            stopping=lambda: calls.append("stopping"), task_status=task_status))
        assert calls == ["ready"] and (tmp_path / "pid").exists()
        assert oct((tmp_path / "q.sock").stat().st_mode & 0o777) == "0o600"
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        greeting = await stream.receive_some(65536)
        assert greeting.startswith(b'{\r\n    "QMP": {')
        await stream.aclose()
        daemon.request_shutdown("host-qmp-quit")
    assert calls == ["ready", "stopping"]
    assert not (tmp_path / "pid").exists() and not (tmp_path / "q.sock").exists()


async def test_serve_failure_names_the_option(tmp_path) -> None:
    from qmpd.daemon import Daemon
    from qmpd.listeners import MonitorSpec
    from qmpd.qmp.server import ServerError

    with pytest.raises(ServerError) as info:
        await Daemon().serve([MonitorSpec(FdAddress("abc"), origin="--chardev X")])
    assert str(info.value) == "--chardev X: Unable to parse FD number abc"


def test_argparse_namespace_has_startup_in_order() -> None:
    args = cli.build_parser().parse_args(["--socket", "/a", "--blockdev", "b", "--object", "o",
                                          "--nbd-server", "n", "--export", "e", "--daemonize"])
    assert args.startup == [("blockdev", "b"), ("object", "o"), ("nbd-server", "n"),
                            ("export", "e")]
    assert args.daemonize and isinstance(args, argparse.Namespace)


async def test_abstract_unix_monitor() -> None:
    from qmpd.daemon import Daemon

    args = cli.build_parser().parse_args([
        "--chardev", f"socket,id=m,path=qmpd-unit-{os.getpid()},abstract=on,server=on,wait=off",
        "--monitor", "chardev=m"])
    spec, = cli.monitor_specs(args)
    assert spec.address == UnixAddress(f"qmpd-unit-{os.getpid()}", abstract=True)
    daemon = Daemon()
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.serve, [spec])
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.connect("\0" + spec.address.path)
        assert (await sock.recv(65536)).startswith(b'{"QMP"')
        sock.close()
        daemon.request_shutdown("host-qmp-quit")
