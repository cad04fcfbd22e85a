"""Record how qemu-storage-daemon 7.2 starts under a management stack.

    python -m tests.tools.record_qsd_stack [--out tests/data/stack/qsd-7.2.json]

Three groups, replayed against qmpd by tests/integration/test_stack_integration.py:

- ``argv``: command lines with an inherited descriptor (``--chardev ...,fd=5``,
  ``--nbd-server addr.type=fd,addr.str=5``) of every kind a launcher could get
  wrong, and monitor/chardev option errors: the exit code and stderr, or that
  the daemon started.
- ``daemonize``: ``--daemonize`` that succeeds (the parent's exit code and
  output, and what the detached daemon looks like: cwd, umask, stdio,
  session) and that fails (the parent's exit code and stderr).
- ``pretty``: the bytes a ``pretty=on`` monitor writes for a few requests.

stderr is stored with the program name as ``{prog}`` and the case's
directory as ``{dir}``; the descriptor under test is always number 5 (the
launcher moves it there), so the command lines are the same in every run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.integration.launch import launch, read_greeting

DATA = Path(__file__).resolve().parent.parent / "data" / "stack" / "qsd-7.2.json"
FD = 5
MONITOR_FD = ["--chardev", f"socket,id=m,fd={FD},server=on,wait=off", "--monitor", "chardev=m"]
#: How long a daemon that does not exit at once is given before it counts as started.
STARTED_AFTER = 1.5


def C(name: str, argv: list[str], fd: str | None = None, **extra: Any) -> dict:
    return {"name": name, "argv": argv, "fd": fd, **extra}


def monitor_fd(text: str) -> list[str]:
    return ["--chardev", f"socket,id=m,fd={text},server=on,wait=off", "--monitor", "chardev=m"]


NBD_FD = ["--nbd-server", f"addr.type=fd,addr.str={FD}"]
UNIX_MONITOR = ["--chardev", "socket,id=m,path={dir}/m.sock,server=on,wait=off"]

ARGV_CASES = [
    # what a launcher can hand over as fd=5
    C("fd-closed", monitor_fd("9")),
    C("fd-regular-file", MONITOR_FD, "regular-file"),
    C("fd-unix-unbound", MONITOR_FD, "unix-unbound"),
    C("fd-unix-bound-not-listening", MONITOR_FD, "unix-bound",
      difference="qsd calls listen() itself; qmpd refuses a socket nobody made listen",
      qmpd="refuses"),
    C("fd-inet-unbound", MONITOR_FD, "inet-unbound",
      difference="qsd's listen() binds it to a random port nobody knows; qmpd refuses it",
      qmpd="refuses"),
    C("fd-unix-datagram", MONITOR_FD, "unix-dgram"),
    C("fd-connected-socketpair", MONITOR_FD, "socketpair"),
    C("fd-unix-listening", MONITOR_FD, "unix-listening"),
    C("fd-inet-listening", MONITOR_FD, "inet-listening"),
    C("fd-text-not-a-number", monitor_fd("abc")),
    C("fd-text-out-of-range", monitor_fd("99999999999")),
    C("fd-text-trailing-space", monitor_fd(f"{FD} "), "unix-listening"),
    C("fd-text-plus-sign", monitor_fd(f"+{FD}"), "unix-listening"),
    C("fd-text-negative", monitor_fd("-1")),
    C("fd-without-server", ["--chardev", f"socket,id=m,fd={FD}", "--monitor", "chardev=m"],
      "unix-listening", difference="qsd takes it as a client connection (server=off is its "
      "default); qmpd's chardevs only listen, server=on or not", qmpd="starts"),
    # the NBD server's addr.type=fd
    C("nbd-fd-closed", ["--nbd-server", "addr.type=fd,addr.str=9"]),
    C("nbd-fd-regular-file", NBD_FD, "regular-file"),
    C("nbd-fd-unix-unbound", NBD_FD, "unix-unbound"),
    C("nbd-fd-not-a-number", ["--nbd-server", "addr.type=fd,addr.str=abc"]),
    C("nbd-fd-unix-listening", NBD_FD, "unix-listening"),
    # chardev and monitor options
    C("chardev-no-id", ["--chardev", "socket,path={dir}/m.sock,server=on,wait=off"]),
    C("chardev-path-and-fd", ["--chardev", "socket,id=m,path={dir}/m.sock,fd=5,server=on,"
                                           "wait=off", "--monitor", "chardev=m"]),
    C("chardev-unknown-option", ["--chardev", "socket,id=m,path={dir}/m.sock,server=on,"
                                              "wait=off,bogus=1", "--monitor", "chardev=m"]),
    C("chardev-server-not-boolean", ["--chardev", "socket,id=m,path={dir}/m.sock,server=maybe,"
                                                  "wait=off", "--monitor", "chardev=m"]),
    C("chardev-duplicate-id", [*UNIX_MONITOR, "--chardev",
                               "socket,id=m,path={dir}/n.sock,server=on,wait=off"]),
    C("tcp-no-port", ["--chardev", "socket,id=m,host=127.0.0.1,server=on,wait=off",
                      "--monitor", "chardev=m"]),
    C("tcp-bad-port", ["--chardev", "socket,id=m,host=127.0.0.1,port=abc,server=on,wait=off",
                       "--monitor", "chardev=m"]),
    C("tcp-no-family", ["--chardev", "socket,id=m,host=localhost,port=4,ipv4=off,ipv6=off,"
                                     "server=on,wait=off", "--monitor", "chardev=m"]),
    C("tcp-port-in-use", ["--chardev", "socket,id=m,host=127.0.0.1,port={busy_port},"
                                       "server=on,wait=off", "--monitor", "chardev=m"]),
    C("monitor-unknown-chardev", ["--monitor", "chardev=zz"]),
    C("monitor-without-chardev", [*UNIX_MONITOR, "--monitor", "pretty=on"]),
    C("monitor-twice-on-one-chardev", [*UNIX_MONITOR, "--monitor", "chardev=m",
                                       "--monitor", "chardev=m"]),
    C("monitor-readline", [*UNIX_MONITOR, "--monitor", "chardev=m,mode=readline"]),
    C("monitor-pretty-not-boolean", [*UNIX_MONITOR, "--monitor", "chardev=m,pretty=maybe"]),
]

DAEMONIZE_OK = ["--daemonize", "--pidfile", "{dir}/d.pid",
                "--chardev", "socket,id=m,path={dir}/d.sock,server=on,wait=off",
                "--monitor", "chardev=m"]
DAEMONIZE_FAIL_CASES = [
    C("daemonize-fd-closed", ["--daemonize", *monitor_fd("9")]),
    C("daemonize-fd-unix-unbound", ["--daemonize", *MONITOR_FD], "unix-unbound"),
    C("daemonize-pidfile-unwritable", ["--daemonize", "--pidfile", "/nonexistent/d.pid",
                                       "--chardev", "socket,id=m,path={dir}/d.sock,server=on,"
                                                    "wait=off", "--monitor", "chardev=m"]),
    C("daemonize-blockdev-missing-file", [
        "--daemonize", "--chardev", "socket,id=m,path={dir}/d.sock,server=on,wait=off",
        "--monitor", "chardev=m",
        "--blockdev", "driver=file,node-name=f0,filename={dir}/missing.img"]),
]

#: Requests whose replies qsd and qmpd give alike (the version aside).
PRETTY_REQUESTS = [
    b'{"execute": "qmp_capabilities"}',
    b'{"execute": "query-version", "id": [1, {"a": [], "b": {"c": null}}, {}, "\\u00e9\\n"]}',
    b'{"execute": "no-such-command", "id": 7}',
    b'{"execute": "query-named-block-nodes", "arguments": {"flat": true}}',
    b'{"execute": "query-jobs"}',
    b'{"execute": "query-block-exports"}',
    b'{"execute": "object-add", "arguments": {"qom-type": "secret", "id": "s0", "data": "pw"}}',
    b'{"execute": "object-add", "arguments": {"qom-type": "secret", "id": "s0", "data": "pw"}}',
    b'{"execute": 1}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "f0", '
    b'"filename": "{dir}/img.raw"}}',
    b'{"execute": "query-named-block-nodes", "arguments": {"flat": true}}',
    b'{"execute": "blockdev-del", "arguments": {"node-name": "f0"}}',
    b'{"execute": "quit"}',
]


# -- descriptors a launcher might pass --------------------------------------------------------

_PEERS: list[socket.socket] = []

def make_fd(kind: str, tmp: str) -> Any:
    """An object whose descriptor the launcher moves to number 5."""
    if kind == "regular-file":
        f = open(os.path.join(tmp, "regular"), "w")  # noqa: SIM115 - kept open for the case
        return f
    if kind == "unix-unbound":
        return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if kind == "unix-bound":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(os.path.join(tmp, "bound.sock"))
        return s
    if kind == "inet-unbound":
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if kind == "unix-dgram":
        return socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if kind == "socketpair":
        a, b = socket.socketpair()
        _PEERS.append(b)   # the other end stays open: a connected socket
        return a
    if kind == "unix-listening":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(os.path.join(tmp, "listening.sock"))
        s.listen(8)
        return s
    if kind == "inet-listening":
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        return s
    raise ValueError(kind)


def busy_port() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s


def expand(argv: list[str], values: dict[str, str]) -> list[str]:
    out = []
    for arg in argv:
        for key, value in values.items():
            arg = arg.replace("{" + key + "}", value)
        out.append(arg)
    return out


def normalise(text: str, prog: str, tmp: str, values: dict[str, str] | None = None) -> str:
    for key, value in (values or {}).items():
        if key != "dir":
            text = text.replace(value, "{" + key + "}")
    return text.replace(tmp, "{dir}").replace(f"{prog}: ", "{prog}: ")


def run_argv_case(command: list[str], prog: str, case: dict, *, ready=None) -> dict:
    """Start ``command + argv`` with the case's descriptor at 5: how it ended.

    ``ready(proc, tmp)``: returns True once the daemon is known to run
    (qmpd: its sd_notify); without it, running after STARTED_AFTER counts.
    """
    tmp = tempfile.mkdtemp(prefix="qsdstack-")
    keep = []
    try:
        port_holder = busy_port()
        keep.append(port_holder)
        values = {"dir": tmp, "busy_port": str(port_holder.getsockname()[1])}
        fds = {}
        if case.get("fd"):
            obj = make_fd(case["fd"], tmp)
            keep.append(obj)
            fds[FD] = obj
        env = dict(os.environ)
        notify = None
        if ready is not None:
            notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            notify.bind(os.path.join(tmp, "notify"))
            keep.append(notify)
            env["NOTIFY_SOCKET"] = os.path.join(tmp, "notify")
        proc = launch([*command, *expand(case["argv"], values)], fds, env=env,
                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        started = False
        if notify is not None:
            started = ready(proc, notify)
        else:
            try:
                proc.wait(STARTED_AFTER)
            except subprocess.TimeoutExpired:
                started = True
        if started:
            proc.terminate()
        out, err = proc.communicate(timeout=20)
        if started:
            return {"started": True}
        return {"started": False, "returncode": proc.returncode,
                "stdout": normalise(out.decode(errors="replace"), prog, tmp, values),
                "stderr": normalise(err.decode(errors="replace"), prog, tmp, values)}
    finally:
        for obj in keep:
            obj.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _proc_facts(pid: int) -> dict:
    status = {line.split(":")[0]: line.split(":", 1)[1].strip()
              for line in Path(f"/proc/{pid}/status").read_text().splitlines()}
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    pgrp, session = int(stat[2]), int(stat[3])
    return {"cwd": os.readlink(f"/proc/{pid}/cwd"), "umask": status.get("Umask"),
            "stdio": [os.readlink(f"/proc/{pid}/fd/{n}") for n in (0, 1, 2)],
            "session_leader": session == pid, "new_session": pgrp == session,
            "tty": int(stat[4]) != 0}


def run_daemonize_ok(command: list[str], prog: str) -> dict:
    """--daemonize that succeeds: the parent's outcome and the daemon's state."""
    tmp = tempfile.mkdtemp(prefix="qsdstack-")
    try:
        argv = expand(DAEMONIZE_OK, {"dir": tmp})
        out = subprocess.run([*command, *argv], capture_output=True, timeout=60,
                             stdin=subprocess.DEVNULL, check=False)
        facts: dict[str, Any] = {"returncode": out.returncode,
                                 "stdout": normalise(out.stdout.decode(), prog, tmp),
                                 "stderr": normalise(out.stderr.decode(), prog, tmp)}
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(os.path.join(tmp, "d.sock"))   # at once: no polling
            facts["accepting_when_parent_exits"] = True
            greeting = read_greeting(sock)
            facts["greeting_is_qmp"] = greeting.startswith(b'{"QMP"')
            pid_text = Path(tmp, "d.pid").read_text()
            pid = int(pid_text)
            facts["pidfile"] = pid_text.replace(str(pid), "{pid}")
            facts.update(_proc_facts(pid))
            sock.sendall(b'{"execute": "qmp_capabilities"}{"execute": "quit"}')
            sock.settimeout(10)
            while sock.recv(65536):
                pass
            deadline = time.monotonic() + 10
            while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
                time.sleep(0.02)
            facts["exited_after_quit"] = not os.path.exists(f"/proc/{pid}")
            facts["pidfile_removed"] = not os.path.exists(os.path.join(tmp, "d.pid"))
            facts["socket_removed"] = not os.path.exists(os.path.join(tmp, "d.sock"))
        except OSError:
            facts["accepting_when_parent_exits"] = False
        finally:
            sock.close()
        return facts
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_daemonize_fail(command: list[str], prog: str, case: dict) -> dict:
    tmp = tempfile.mkdtemp(prefix="qsdstack-")
    keep = []
    try:
        fds = {}
        if case.get("fd"):
            obj = make_fd(case["fd"], tmp)
            keep.append(obj)
            fds[FD] = obj
        proc = launch([*command, *expand(case["argv"], {"dir": tmp})], fds,
                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = proc.communicate(timeout=60)
        return {"returncode": proc.returncode,
                "stdout": normalise(out.decode(errors="replace"), prog, tmp),
                "stderr": normalise(err.decode(errors="replace"), prog, tmp)}
    finally:
        for obj in keep:
            obj.close()
        shutil.rmtree(tmp, ignore_errors=True)


def pretty_transcript(sock_path: str, tmp: str) -> list[str]:
    """The greeting and the replies to PRETTY_REQUESTS, as latin-1 text (bytes exactly;
    the case's directory as {dir})."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(sock_path)
    sock.settimeout(10)
    try:
        chunks = [_read_message(sock)]
        for request in PRETTY_REQUESTS:
            sock.sendall(request.replace(b"{dir}", tmp.encode()))
            chunks.append(_read_message(sock))
        # quit: the SHUTDOWN event follows its reply, then the connection closes
        rest = b""
        while True:
            data = sock.recv(65536)
            if not data:
                break
            rest += data
        chunks.append(rest)
    finally:
        sock.close()
    return [c.decode("latin-1").replace(tmp, "{dir}") for c in chunks]


def _read_message(sock: socket.socket) -> bytes:
    """One pretty-printed message: ends with a line that is just '}'."""
    data = b""
    while not (data.endswith(b"\r\n}\r\n") or data == b"}\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def record_pretty(command: list[str]) -> list[str]:
    tmp = tempfile.mkdtemp(prefix="qsdstack-")
    try:
        path = os.path.join(tmp, "p.sock")
        with open(os.path.join(tmp, "img.raw"), "wb") as f:
            f.truncate(1 << 20)
        proc = subprocess.Popen([*command, "--chardev",
                                 f"socket,id=m,path={path},server=on,wait=off",
                                 "--monitor", "chardev=m,pretty=on"], stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 20
            while not os.path.exists(path):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("daemon did not start")
                time.sleep(0.02)
            return pretty_transcript(path, tmp)
        finally:
            proc.wait(20)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qsd", default="qemu-storage-daemon")
    parser.add_argument("--out", type=Path, default=DATA)
    opts = parser.parse_args()
    command = [opts.qsd]
    prog = "qemu-storage-daemon"
    version = subprocess.run([opts.qsd, "--version"], capture_output=True, text=True,
                             check=False).stdout
    doc = {
        "qsd_version": version.splitlines()[0] if version else "?",
        "argv": [{**case, "qsd": run_argv_case(command, prog, case)} for case in ARGV_CASES],
        "daemonize_ok": {"argv": DAEMONIZE_OK, "qsd": run_daemonize_ok(command, prog)},
        "daemonize_fail": [{**case, "qsd": run_daemonize_fail(command, prog, case)}
                           for case in DAEMONIZE_FAIL_CASES],
        "pretty": {"requests": [r.decode() for r in PRETTY_REQUESTS],
                   "qsd": record_pretty(command)},
    }
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
