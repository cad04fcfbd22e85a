"""Start a daemon the way management stacks do: with sockets the parent bound.

``launch(argv, fds={target: sock})`` forks a tiny launcher that moves each
socket to its target descriptor number and execs ``argv`` (the pid stays the
same), optionally as systemd does (LISTEN_PID = that pid, LISTEN_FDS,
LISTEN_FDNAMES). libvirt's way, ``fd=N`` on the command line, needs no
launcher (``subprocess.Popen(..., pass_fds=[N])``) but goes through it here
too so that N is the same number in every run and in qsd's recordings.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

LAUNCHER = r"""
import fcntl, json, os, sys
spec = json.loads(sys.argv[1])
argv = sys.argv[2:]
held = [(fcntl.fcntl(src, fcntl.F_DUPFD_CLOEXEC, 100), target) for src, target in spec["moves"]]
for temporary, target in held:
    os.dup2(temporary, target)        # inheritable: the daemon gets it
for temporary, _ in held:
    os.close(temporary)
for src, _ in spec["moves"]:
    if src not in [t for _, t in spec["moves"]]:
        os.close(src)
if spec.get("systemd"):
    os.environ["LISTEN_PID"] = str(os.getpid()) if spec.get("pid") is None else spec["pid"]
    os.environ["LISTEN_FDS"] = str(spec.get("count", len(spec["moves"])))
    if spec.get("names") is not None:
        os.environ["LISTEN_FDNAMES"] = ":".join(spec["names"])
os.execvp(argv[0], argv)
"""


def launch(argv: Sequence[str], fds: Mapping[int, Any] | None = None, *,
           systemd: bool = False, names: Sequence[str] | None = None,
           listen_pid: str | None = None, env: Mapping[str, str] | None = None,
           **popen: Any) -> subprocess.Popen:
    """Exec ``argv`` with ``fds`` ({target number: socket or file}) in place.

    ``systemd``: set LISTEN_PID/LISTEN_FDS (and LISTEN_FDNAMES from ``names``);
    the targets should then be 3, 4, ... ``listen_pid`` overrides LISTEN_PID.
    """
    fds = dict(fds or {})
    moves = [[obj if isinstance(obj, int) else obj.fileno(), target]
             for target, obj in sorted(fds.items())]
    spec = {"moves": moves, "systemd": systemd,
            "names": list(names) if names is not None else None, "pid": listen_pid}
    full_env = dict(os.environ if env is None else env)
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        full_env.pop(name, None)
    return subprocess.Popen([sys.executable, "-c", LAUNCHER, json.dumps(spec), *argv],
                            pass_fds=[src for src, _ in moves], env=full_env, **popen)


def listening_unix(path: str, backlog: int = 16) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(backlog)
    return sock


def wait_accepting(path: str, proc: subprocess.Popen | None = None, timeout: float = 15) -> None:
    """Poll until ``path`` accepts (only for tests that do not test readiness)."""
    deadline = time.monotonic() + timeout
    while True:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
            return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {proc.returncode}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(path) from None
            time.sleep(0.02)
        finally:
            probe.close()


def read_greeting(sock: socket.socket, timeout: float = 10) -> bytes:
    """The first QMP message (up to CR LF) of a monitor connection."""
    sock.settimeout(timeout)
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def json_lines(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.split(b"\r\n") if line.strip()]
