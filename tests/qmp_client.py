"""The tests' one blocking QMP client, for qmpd and qemu-storage-daemon alike.

Raw enough for hostile tests (``send`` writes any bytes, ``recv`` returns
the next message, reply or event) and convenient enough for the rest
(``cmd``/``ok``, events set aside in order while waiting for a reply,
``wait_event``, ``run_job``). QEMU writes non-finite doubles as C does
(``inf``, ``nan``), which ``decode_message`` accepts.
"""

from __future__ import annotations

import json
import re
import socket
import time
from typing import Any


def connect_unix(path: str, timeout: float = 0.0) -> socket.socket:
    """A connected unix stream socket, retrying for ``timeout`` seconds while
    the daemon is still starting."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except OSError:
            sock.close()
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.02)


class ConnectionClosed(EOFError):
    """The peer closed the connection; the exception holds what was left unread."""


class QmpClient:
    """One QMP connection over a unix socket.

    ``connect_timeout``: keep trying to connect that long (a daemon that is
    still starting); ``negotiate``: send qmp_capabilities after the greeting.
    ``timeout`` is the default wait for each message.
    """

    def __init__(self, path: str, *, timeout: float = 10.0, connect_timeout: float = 0.0,
                 negotiate: bool = False) -> None:
        self.timeout = timeout
        self.sock = connect_unix(path, connect_timeout)
        self._buf = b""
        self.events: list[dict] = []
        self.greeting = self.recv()
        if negotiate:
            self.negotiate()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- bytes and messages ---------------------------------------------------------
    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_command(self, command: str, arguments: dict | None = None, **extra: Any) -> None:
        msg: dict[str, Any] = {"execute": command, **extra}
        if arguments is not None:
            msg["arguments"] = arguments
        self.send(json.dumps(msg).encode())

    def recv_line(self, timeout: float | None = None) -> bytes:
        """The next message's bytes (TimeoutError, ConnectionClosed)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no QMP message in time")
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionClosed(self._buf[:200])
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def recv(self, timeout: float | None = None) -> dict:
        """The next message (reply or event)."""
        return decode_message(self.recv_line(timeout))

    def reply(self, timeout: float | None = None) -> dict:
        """The next reply, setting events aside."""
        while True:
            msg = self.recv(timeout)
            if "event" in msg:
                self.events.append(msg)
                continue
            return msg

    # -- commands ------------------------------------------------------------------
    def cmd(self, command: str, arguments: dict | None = None, timeout: float | None = None,
            **extra: Any) -> dict:
        self.send_command(command, arguments, **extra)
        return self.reply(timeout)

    def ok(self, command: str, arguments: dict | None = None,
           timeout: float | None = None) -> Any:
        reply = self.cmd(command, arguments, timeout)
        assert "return" in reply, f"{command}: {reply}"
        return reply["return"]

    def negotiate(self) -> QmpClient:
        assert self.cmd("qmp_capabilities") == {"return": {}}
        return self

    # -- events and jobs -------------------------------------------------------------
    def wait_event(self, name: str, timeout: float = 60.0, **data: Any) -> dict:
        """The first event ``name`` whose data has these members (set-aside ones first)."""
        def matches(msg: dict) -> bool:
            return msg["event"] == name and all(msg.get("data", {}).get(k) == v
                                                for k, v in data.items())
        for i, ev in enumerate(self.events):
            if matches(ev):
                return self.events.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {name} event within {timeout} s")
            msg = self.recv(remaining)
            if "event" not in msg:
                raise AssertionError(f"unexpected reply while waiting for {name}: {msg}")
            if matches(msg):
                return msg
            self.events.append(msg)

    def wait_job(self, job_id: str, timeout: float = 60.0) -> dict:
        """Wait for the job to conclude; its query-jobs entry, the job dismissed."""
        self.wait_event("JOB_STATUS_CHANGE", timeout, id=job_id, status="concluded")
        info = [j for j in self.ok("query-jobs") if j["id"] == job_id][0]
        self.ok("job-dismiss", {"id": job_id})
        return info

    def run_job(self, command: str, arguments: dict, job_id: str,
                timeout: float = 120.0) -> dict:
        """Start a job and wait_job it."""
        self.ok(command, arguments)
        return self.wait_job(job_id, timeout)


def decode_message(line: bytes) -> dict:
    """Parse one message; QEMU writes non-finite doubles as C does (``inf``, ``nan``)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        text = re.sub(rb"(?<=[:\[,] )(-?)inf(?=[,}\]])", rb"\1Infinity", line)
        return json.loads(re.sub(rb"(?<=[:\[,] )-?nan(?=[,}\]])", rb"NaN", text))
