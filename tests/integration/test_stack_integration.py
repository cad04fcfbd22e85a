"""qmpd started the way management stacks start storage daemons.

- libvirt's way: the parent binds and listens, then execs the daemon with
  ``--chardev socket,id=ID,fd=N,server=on,wait=off`` (and the NBD server's
  ``addr.type=fd``); every kind of wrong descriptor is refused, with qsd's
  texts where qsd refuses it too (tests/data/stack/qsd-7.2.json).
- systemd's way: LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES, readiness and
  shutdown through sd_notify on a NOTIFY_SOCKET the test binds; the shipped
  units in examples/systemd, as systemd would run them.
- ``--daemonize``: the parent's exit is the readiness signal; the detached
  daemon looks as qsd's does.
- QMP over TCP, and ``pretty=on`` byte for byte as qsd writes it.

Readiness is never polled for here: a test connects right after READY=1 or
after --daemonize's parent exits, and that must work the first time.
"""

from __future__ import annotations

import asyncio
import configparser
import json
import os
import re
import select
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.integration.launch import launch, listening_unix, read_greeting
from tests.tools import record_qsd_stack as rec

QMPD = [sys.executable, "-m", "qmpd"]
RECORDED = json.loads(rec.DATA.read_text())
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "systemd"
NBD_GREETING = b"NBDMAGIC" + b"IHAVEOPT"


@pytest.fixture
def wd():
    path = tempfile.mkdtemp(prefix="stack-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Notify:
    """The NOTIFY_SOCKET a test binds: a Unix datagram socket."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path if not path.startswith("@") else "\0" + path[1:])

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "NOTIFY_SOCKET": self.path, **extra}

    def wait(self, proc: subprocess.Popen | None = None, timeout: float = 30) -> dict[str, str]:
        """The next notification as a dict; fails if ``proc`` exits first."""
        deadline = time.monotonic() + timeout
        while True:
            ready, _, _ = select.select([self.sock], [], [], 0.05)
            if ready:
                data = self.sock.recv(4096).decode()
                return dict(line.split("=", 1) for line in data.split("\n") if line)
            if proc is not None and proc.poll() is not None:
                out = proc.stderr.read().decode() if proc.stderr else ""
                pytest.fail(f"daemon exited with {proc.returncode} before notifying: {out}")
            if time.monotonic() > deadline:
                pytest.fail("no notification within the timeout")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(wd):
    n = Notify(os.path.join(wd, "notify"))
    yield n
    n.close()


@pytest.fixture
def processes():
    """Daemons to stop at teardown: Popen objects and (for --daemonize) pids."""
    started: list = []
    yield started
    for item in started:
        if isinstance(item, subprocess.Popen):
            if item.poll() is None:
                item.terminate()
                try:
                    item.wait(10)
                except subprocess.TimeoutExpired:
                    item.kill()
                    item.wait()
        else:
            try:
                os.kill(item, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + 10
            while os.path.exists(f"/proc/{item}") and time.monotonic() < deadline:
                time.sleep(0.02)


def qmp_sync(address):
    from qemu.qmp.legacy import QEMUMonitorProtocol

    qmp = QEMUMonitorProtocol(address)
    qmp.connect(negotiate=True)
    return qmp


def qmp_async_version(address) -> dict:
    from qemu.qmp import QMPClient

    async def scenario():
        client = QMPClient("stack-test")
        await client.connect(address)
        try:
            return await client.execute("query-version")
        finally:
            await client.disconnect()

    return asyncio.run(scenario())


def start(argv, fds=None, *, notify: Notify | None = None, processes=None, **kw):
    env = notify.env() if notify is not None else None
    proc = launch([*QMPD, *argv], fds, env=env, stdin=subprocess.DEVNULL,
                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)
    if processes is not None:
        processes.append(proc)
    return proc


def stop(proc: subprocess.Popen, notify: Notify | None = None) -> None:
    proc.send_signal(signal.SIGTERM)
    if notify is not None:
        assert notify.wait(proc).get("STOPPING") == "1"
    assert proc.wait(20) == 0


def raw_image(wd: str, size: int = 1 << 20) -> str:
    path = os.path.join(wd, "disk.raw")
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def export_args(image: str, nbd_addr: str) -> list[str]:
    return ["--blockdev", f"driver=file,node-name=disk,filename={image}",
            "--nbd-server", nbd_addr, "--export", "type=nbd,id=e0,node-name=disk,name=disk"]


def nbd_greeting(path: str) -> bytes:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(10)
        s.connect(path)
        data = b""
        while len(data) < 18:
            chunk = s.recv(18 - len(data))
            if not chunk:
                break
            data += chunk
        return data
    finally:
        s.close()


# -- the recorded command lines, against qmpd ---------------------------------------------------

def _qmpd_ready(proc: subprocess.Popen, notify_sock: socket.socket) -> bool:
    """READY=1 arrived (True) or the daemon exited (False)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready, _, _ = select.select([notify_sock], [], [], 0.05)
        if ready and b"READY=1" in notify_sock.recv(4096):
            return True
        if proc.poll() is not None:
            return False
    raise AssertionError("qmpd neither became ready nor exited")


def _for_qmpd(case: dict) -> dict:
    """qmpd needs a QMP monitor where qsd runs without one: add a --socket."""
    if "--monitor" in case["argv"]:
        return case
    return {**case, "argv": ["--socket", "{dir}/extra.sock", *case["argv"]]}


@pytest.mark.parametrize("recorded", RECORDED["argv"], ids=lambda c: c["name"])
def test_command_line_as_qsd(recorded: dict) -> None:
    got = rec.run_argv_case(QMPD, "qmpd", _for_qmpd(recorded), ready=_qmpd_ready)
    qsd = recorded["qsd"]
    if recorded.get("qmpd") == "refuses":
        # qsd starts on these; qmpd refuses them, clearly, and exits 1
        assert qsd["started"] and not got["started"], got
        assert got["returncode"] == 1
        assert got["stderr"] == (f"{{prog}}: --chardev {recorded['argv'][1]}: File descriptor "
                                 f"'{rec.FD}' is not a listening socket (the process that "
                                 "passes it must call listen() first)\n")
        return
    assert got == qsd


# -- libvirt's way: fd=N ---------------------------------------------------------------------

def test_fd_passing_unix_monitor_with_notify(wd, notify, processes) -> None:
    parent = listening_unix(os.path.join(wd, "mon.sock"))
    fd = parent.fileno()
    proc = subprocess.Popen(
        [*QMPD, "--chardev", f"socket,id=charmonitor,fd={fd},server=on,wait=off",
         "--monitor", "chardev=charmonitor"],
        pass_fds=[fd], env=notify.env(), stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    processes.append(proc)
    parent.close()   # the daemon holds it now, as after libvirt's exec
    ready = notify.wait(proc)
    assert ready["READY"] == "1" and "MAINPID" not in ready
    qmp = qmp_sync(os.path.join(wd, "mon.sock"))
    try:
        assert qmp.cmd("query-version")["package"].startswith("qmpd ")
    finally:
        qmp.close()
    assert qmp_async_version(os.path.join(wd, "mon.sock"))["qemu"]["major"] == 7
    stop(proc, notify)
    # the socket was not ours to make, so it is not ours to remove; it no longer accepts
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with pytest.raises(ConnectionRefusedError):
        probe.connect(os.path.join(wd, "mon.sock"))
    probe.close()


def test_fd_passing_tcp_listener(notify, processes) -> None:
    parent = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    parent.bind(("127.0.0.1", 0))
    parent.listen(4)
    address = parent.getsockname()
    proc = start(["--chardev", "socket,id=m,fd=5,server=on,wait=off", "--monitor", "chardev=m"],
                 {5: parent}, notify=notify, processes=processes)
    parent.close()
    notify.wait(proc)
    assert qmp_async_version(address)["qemu"]["minor"] == 2
    stop(proc, notify)


def test_nbd_server_on_an_inherited_fd(wd, notify, processes) -> None:
    image = raw_image(wd)
    nbd = listening_unix(os.path.join(wd, "nbd.sock"))
    mon = listening_unix(os.path.join(wd, "mon.sock"))
    proc = start(["--chardev", "socket,id=m,fd=4,server=on,wait=off", "--monitor", "chardev=m",
                  *export_args(image, "addr.type=fd,addr.str=5")],
                 {4: mon, 5: nbd}, notify=notify, processes=processes)
    nbd.close()
    mon.close()
    notify.wait(proc)   # READY=1 counts the NBD server and its export
    assert nbd_greeting(os.path.join(wd, "nbd.sock")).startswith(NBD_GREETING)
    qmp = qmp_sync(os.path.join(wd, "mon.sock"))
    try:
        exports = qmp.cmd("query-block-exports")
        assert [e["id"] for e in exports] == ["e0"]
        qmp.cmd("nbd-server-stop")
    finally:
        qmp.close()
    # the inherited descriptor was taken over, not duplicated: stopping closes it (the
    # NBD server closes its listeners as its task unwinds, just after the reply)
    assert _refuses_soon(os.path.join(wd, "nbd.sock"))
    stop(proc, notify)


def _refuses_soon(path: str, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            return True
        finally:
            probe.close()
        time.sleep(0.02)
    return False


@pytest.mark.interop
def test_inherited_nbd_socket_serves_qemu_img(wd, notify, processes) -> None:
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img is not installed")
    image = raw_image(wd, 4 << 20)
    nbd = listening_unix(os.path.join(wd, "nbd.sock"))
    proc = start(["--socket", os.path.join(wd, "m.sock"),
                  *export_args(image, "addr.type=fd,addr.str=5")],
                 {5: nbd}, notify=notify, processes=processes)
    nbd.close()
    notify.wait(proc)
    out = subprocess.run(["qemu-img", "info", "--output=json",
                          f"nbd+unix:///disk?socket={wd}/nbd.sock"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["virtual-size"] == 4 << 20
    stop(proc, notify)


def test_one_descriptor_cannot_serve_twice(wd, processes) -> None:
    mon = listening_unix(os.path.join(wd, "mon.sock"))
    proc = start(["--chardev", "socket,id=a,fd=5,server=on,wait=off", "--monitor", "chardev=a",
                  "--chardev", "socket,id=b,fd=5,server=on,wait=off", "--monitor", "chardev=b"],
                 {5: mon}, processes=processes)
    assert proc.wait(30) == 1
    assert "File descriptor '5' is already in use" in proc.stderr.read().decode()


# -- systemd's way: LISTEN_FDS -----------------------------------------------------------------

def test_socket_activation_one_socket(wd, notify, processes) -> None:
    sock = listening_unix(os.path.join(wd, "qmp.sock"))
    proc = start([], {3: sock}, systemd=True, notify=notify, processes=processes)
    sock.close()
    assert notify.wait(proc)["READY"] == "1"
    assert qmp_async_version(os.path.join(wd, "qmp.sock"))["package"].startswith("qmpd ")
    stop(proc, notify)


def test_socket_activation_two_named_sockets_qmp_and_nbd(wd, notify, processes) -> None:
    image = raw_image(wd)
    qmp_sock = listening_unix(os.path.join(wd, "qmp.sock"))
    nbd_sock = listening_unix(os.path.join(wd, "nbd.sock"))
    proc = start(export_args(image, "addr.type=fd,addr.str=nbd"), {3: nbd_sock, 4: qmp_sock},
                 systemd=True, names=["nbd", "qmp"], notify=notify, processes=processes)
    qmp_sock.close()
    nbd_sock.close()
    notify.wait(proc)
    assert nbd_greeting(os.path.join(wd, "nbd.sock")).startswith(NBD_GREETING)
    qmp = qmp_sync(os.path.join(wd, "qmp.sock"))
    try:
        assert [e["node-name"] for e in qmp.cmd("query-block-exports")] == ["disk"]
    finally:
        qmp.close()
    stop(proc, notify)


def test_socket_activation_names_pick_the_monitor_options(wd, notify, processes) -> None:
    ctl = listening_unix(os.path.join(wd, "ctl.sock"))
    plain = listening_unix(os.path.join(wd, "plain.sock"))
    proc = start(["--chardev", "socket,id=c,fd=ctl,server=on,wait=off",
                  "--monitor", "chardev=c,pretty=on"], {3: plain, 4: ctl},
                 systemd=True, names=["plain", "ctl"], notify=notify, processes=processes)
    ctl.close()
    plain.close()
    notify.wait(proc)
    for name, pretty in (("ctl.sock", True), ("plain.sock", False)):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(os.path.join(wd, name))
        greeting = read_greeting(s)
        s.close()
        assert greeting.startswith(b"{\r\n") == pretty, (name, greeting)
    stop(proc, notify)


def test_socket_activation_one_name_two_sockets_both_serve(wd, notify, processes) -> None:
    socks = [listening_unix(os.path.join(wd, f"s{i}.sock")) for i in range(2)]
    inet = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    inet.bind(("127.0.0.1", 0))
    inet.listen(4)
    address = inet.getsockname()
    proc = start([], {3: socks[0], 4: socks[1], 5: inet}, systemd=True,
                 names=["qmpd.socket"] * 3, notify=notify, processes=processes)
    for s in [*socks, inet]:
        s.close()
    notify.wait(proc)
    for target in (os.path.join(wd, "s0.sock"), os.path.join(wd, "s1.sock"), address):
        assert qmp_async_version(target)["qemu"]["major"] == 7
    stop(proc, notify)


def test_socket_activation_for_another_pid_is_ignored(wd, processes) -> None:
    sock = listening_unix(os.path.join(wd, "qmp.sock"))
    proc = start([], {3: sock}, systemd=True, listen_pid="1", processes=processes)
    assert proc.wait(30) == 1
    assert "no QMP socket" in proc.stderr.read().decode()


@pytest.mark.parametrize("kind, text", [
    ("unix-bound", "LISTEN_FDS socket 3 (name 'qmp'): File descriptor '3' is not a listening "
                   "socket"),
    ("socketpair", "LISTEN_FDS socket 3 (name 'qmp'): Failed to listen on fd socket: "
                   "Invalid argument"),
    ("regular-file", "LISTEN_FDS socket 3 (name 'qmp'): File descriptor '3' is not a socket"),
])
def test_socket_activation_with_a_bad_socket(wd, processes, kind, text) -> None:
    obj = rec.make_fd(kind, wd)
    proc = start([], {3: obj}, systemd=True, names=["qmp"], processes=processes)
    assert proc.wait(30) == 1
    assert f"qmpd: {text}" in proc.stderr.read().decode()
    obj.close()


def test_socket_activation_names_must_match_the_count(wd, processes) -> None:
    sock = listening_unix(os.path.join(wd, "qmp.sock"))
    proc = start([], {3: sock}, systemd=True, names=["a", "b"], processes=processes)
    assert proc.wait(30) == 1
    assert "LISTEN_FDNAMES has 2 names for 1 sockets" in proc.stderr.read().decode()


def test_ready_only_after_start_up_and_stopping_at_shutdown(wd, processes) -> None:
    notify = Notify("@qmpd-test-" + os.path.basename(wd))   # an abstract NOTIFY_SOCKET
    try:
        image = raw_image(wd)
        sock = listening_unix(os.path.join(wd, "qmp.sock"))
        proc = start(["--pidfile", os.path.join(wd, "pid"),
                      "--blockdev", f"driver=file,node-name=disk,filename={image}"],
                     {3: sock}, systemd=True, notify=notify, processes=processes)
        sock.close()
        assert notify.wait(proc)["READY"] == "1"
        assert Path(wd, "pid").read_text() == f"{proc.pid}\n"
        qmp = qmp_sync(os.path.join(wd, "qmp.sock"))
        try:
            assert "disk" in {n["node-name"] for n in qmp.cmd("query-named-block-nodes")}
            qmp.cmd("quit")
        finally:
            qmp.close()
        assert notify.wait(proc)["STOPPING"] == "1"
        assert proc.wait(20) == 0
        assert not Path(wd, "pid").exists()
    finally:
        notify.close()


# -- --daemonize ---------------------------------------------------------------------------------

def test_daemonize_as_qsd() -> None:
    got = rec.run_daemonize_ok(QMPD, "qmpd")
    assert got == RECORDED["daemonize_ok"]["qsd"]


@pytest.mark.parametrize("recorded", RECORDED["daemonize_fail"], ids=lambda c: c["name"])
def test_daemonize_failure_as_qsd(recorded: dict) -> None:
    assert rec.run_daemonize_fail(QMPD, "qmpd", recorded) == recorded["qsd"]


def test_daemonize_with_socket_activation_and_notify(wd, notify, processes) -> None:
    sock = listening_unix(os.path.join(wd, "qmp.sock"))
    pidfile = os.path.join(wd, "d.pid")
    proc = start(["--daemonize", "--pidfile", pidfile, "--log-level", "info"], {3: sock},
                 systemd=True, notify=notify)
    sock.close()
    assert proc.wait(30) == 0      # the parent: ready
    pid = int(Path(pidfile).read_text())
    processes.append(pid)
    ready = notify.wait()
    assert ready["READY"] == "1" and ready["MAINPID"] == str(pid)
    assert qmp_async_version(os.path.join(wd, "qmp.sock"))["qemu"]["major"] == 7
    os.kill(pid, signal.SIGTERM)
    assert notify.wait()["STOPPING"] == "1"


def test_daemonize_keeps_stderr_for_a_log_level(wd, processes) -> None:
    log = os.path.join(wd, "log")
    with open(log, "wb") as out:
        proc = subprocess.run(
            [*QMPD, "--daemonize", "--log-level", "info", "--pidfile", f"{wd}/d.pid",
             "--socket", f"{wd}/q.sock"], stdin=subprocess.DEVNULL, stdout=out, stderr=out,
            timeout=60, check=False)
    assert proc.returncode == 0
    pid = int(Path(wd, "d.pid").read_text())
    processes.append(pid)
    assert os.readlink(f"/proc/{pid}/fd/2") == log
    assert os.readlink(f"/proc/{pid}/fd/1") == "/dev/null"
    assert "QMP monitor on" in Path(log).read_text()


# -- QMP over TCP ---------------------------------------------------------------------------

def _free_port_range(n: int = 20) -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port if port + n < 65535 else port - n


def test_qmp_over_tcp_warns_and_serves(notify, processes) -> None:
    port = _free_port_range()
    proc = start(["--chardev", f"socket,id=m,host=127.0.0.1,port={port},to={port + 20},"
                               "ipv4=on,server=on,wait=off", "--monitor", "chardev=m"],
                 notify=notify, processes=processes)
    notify.wait(proc)
    for candidate in range(port, port + 21):
        try:
            version = qmp_async_version(("127.0.0.1", candidate))
            break
        except OSError:
            continue
    else:
        pytest.fail("no port of the range accepts")
    assert version["package"].startswith("qmpd ")
    stop(proc, notify)
    log = proc.stderr.read().decode()
    assert "QMP over TCP on 127.0.0.1:" in log and "no authentication" in log


def test_qmp_over_tcp_ipv6(notify, processes) -> None:
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("no IPv6 loopback")
    port = _free_port_range(0)
    proc = start(["--chardev", f"socket,id=m,host=::1,port={port},ipv6=on,server=on,wait=off",
                  "--monitor", "chardev=m"], notify=notify, processes=processes)
    notify.wait(proc)
    assert qmp_async_version(("::1", port))["qemu"]["major"] == 7
    stop(proc, notify)


# -- pretty=on -------------------------------------------------------------------------------

def _version_free(text: str) -> str:
    text = re.sub(r'"micro": \d+', '"micro": N', text)
    return re.sub(r'"package": "[^"]*"', '"package": "P"', text)


def test_pretty_monitor_writes_what_qsd_writes() -> None:
    expected = RECORDED["pretty"]["qsd"]
    got = rec.record_pretty(QMPD)
    # greeting + one reply per request; what follows quit (qmpd's SHUTDOWN event) aside
    n = len(RECORDED["pretty"]["requests"]) + 1
    assert [_version_free(t) for t in got[:n]] == [_version_free(t) for t in expected[:n]]
    assert all("\r\n" in t and "\n" not in t.replace("\r\n", "") for t in got[:n])


# -- the shipped systemd units -----------------------------------------------------------------

def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str   # keys are case-sensitive
    parser.read(EXAMPLES / name)
    return parser


@pytest.mark.parametrize("socket_units", [["qmpd.socket"], ["qmpd.socket", "qmpd-nbd.socket"]])
def test_shipped_units_run_as_systemd_would(wd, notify, processes, socket_units) -> None:
    service = _unit("qmpd@.service")["Service"]
    assert service["Type"] == "notify"
    fds, names, paths = {}, [], {}
    for number, unit_name in enumerate(socket_units, start=3):
        unit = _unit(unit_name)["Socket"]
        assert unit["Service"] == "qmpd@default.service"
        path = os.path.join(wd, os.path.basename(unit["ListenStream"]))
        sock = listening_unix(path)
        os.chmod(path, int(unit["SocketMode"], 8))
        fds[number] = sock
        names.append(unit["FileDescriptorName"])
        paths[unit["FileDescriptorName"]] = path
    qmpd_args = ""
    if "nbd" in paths:
        qmpd_args = (f"--blockdev driver=file,node-name=disk,filename={raw_image(wd)} "
                     "--nbd-server addr.type=fd,addr.str=nbd "
                     "--export type=nbd,id=e0,node-name=disk")
    # ExecStart as systemd expands it: $QMPD_ARGS splits at whitespace
    argv = shlex.split(service["ExecStart"].replace("$QMPD_ARGS", qmpd_args))
    assert argv[0] == "qmpd"
    proc = launch([*QMPD, *argv[1:]], fds, systemd=True, names=names, env=notify.env(),
                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    processes.append(proc)
    for sock in fds.values():
        sock.close()
    assert notify.wait(proc)["READY"] == "1"
    assert qmp_async_version(paths["qmp"])["qemu"]["major"] == 7
    if "nbd" in paths:
        assert nbd_greeting(paths["nbd"]).startswith(NBD_GREETING)
    stop(proc, notify)


def test_shipped_units_pass_systemd_analyze_verify(tmp_path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    for path in EXAMPLES.iterdir():
        text = path.read_text()
        if path.name == "qmpd@.service":   # systemd checks the program exists
            text = text.replace("ExecStart=qmpd ", f"ExecStart={sys.executable} -m qmpd ")
        (tmp_path / path.name).write_text(text)
    out = subprocess.run([analyze, "verify", "--man=no", "qmpd.socket", "qmpd-nbd.socket",
                          "qmpd@default.service"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60, check=False)
    if out.returncode != 0 and "Failed to" in out.stderr and "Unknown key" not in out.stderr \
            and "bad unit file" not in out.stderr:
        pytest.skip(f"systemd-analyze cannot run here: {out.stderr.strip()[:200]}")
    assert out.returncode == 0, out.stderr
    assert stat.S_ISREG((EXAMPLES / "qmpd.socket").stat().st_mode)



# -- systemd's own launcher ------------------------------------------------------------------

def test_under_systemd_socket_activate(wd, notify, processes) -> None:
    tool = shutil.which("systemd-socket-activate")
    if tool is None:
        pytest.skip("systemd-socket-activate is not installed")
    image = raw_image(wd)
    qmp_path, nbd_path = os.path.join(wd, "qmp.sock"), os.path.join(wd, "nbd.sock")
    proc = subprocess.Popen(
        [tool, "-l", qmp_path, "-l", nbd_path, "--fdname=qmp:nbd", "-E", "NOTIFY_SOCKET",
         *QMPD, *export_args(image, "addr.type=fd,addr.str=nbd")],
        env=notify.env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE)
    processes.append(proc)
    deadline = time.monotonic() + 20
    while not os.path.exists(nbd_path):          # the launcher's sockets, not qmpd's
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    # it execs qmpd on the first connection, which qmpd then serves
    assert qmp_async_version(qmp_path)["package"].startswith("qmpd ")
    assert notify.wait(proc)["READY"] == "1"
    assert nbd_greeting(nbd_path).startswith(NBD_GREETING)
    stop(proc, notify)


def test_under_systemd_socket_activate_accept_mode_is_refused(wd, processes) -> None:
    tool = shutil.which("systemd-socket-activate")
    if tool is None:
        pytest.skip("systemd-socket-activate is not installed")
    path = os.path.join(wd, "qmp.sock")
    proc = subprocess.Popen([tool, "--accept", "-l", path, *QMPD],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    processes.append(proc)
    deadline = time.monotonic() + 20
    while not os.path.exists(path):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(path)       # --accept: qmpd gets this connection, not a listener
    client.settimeout(20)
    assert client.recv(100) == b""          # refused: it exits without serving
    client.close()
    proc.terminate()
    err = proc.communicate(timeout=20)[1].decode()
    assert "qmpd: LISTEN_FDS socket 3 (name 'unknown'): Failed to listen on fd socket: " \
           "Invalid argument" in err, err
