"""A blocking raw-socket QMP client for hostile tests: sends any bytes, reads replies."""

from __future__ import annotations

import json
import os
import re
import socket
import time


class ConnectionClosed(Exception):
    pass


class RawQMP:
    """One connection; ``messages()`` yields parsed replies and events."""

    def __init__(self, path: str, *, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self._buf = b""
        self.events: list[dict] = []
        self.greeting = self.recv()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "RawQMP":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, timeout: float | None = None) -> dict:
        """The next message (reply or event)."""
        return decode_message(self.recv_line(timeout))

    def recv_line(self, timeout: float | None = None) -> bytes:
        """The next message's bytes."""
        if timeout is not None:
            self.sock.settimeout(timeout)
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionClosed(self._buf[:200])
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def reply(self, timeout: float | None = None) -> dict:
        """The next reply, setting events aside."""
        while True:
            msg = self.recv(timeout)
            if "event" in msg:
                self.events.append(msg)
                continue
            return msg

    def cmd(self, command: str, arguments: dict | None = None, **extra) -> dict:
        msg: dict = {"execute": command, **extra}
        if arguments is not None:
            msg["arguments"] = arguments
        self.send(json.dumps(msg).encode())
        return self.reply()

    def ok(self, command: str, arguments: dict | None = None) -> object:
        reply = self.cmd(command, arguments)
        assert "return" in reply, reply
        return reply["return"]

    def negotiate(self) -> "RawQMP":
        self.ok("qmp_capabilities")
        return self

    def wait_event(self, name: str, timeout: float = 60.0, **data) -> dict:
        deadline = time.monotonic() + timeout
        for i, ev in enumerate(self.events):
            if ev["event"] == name and all(ev.get("data", {}).get(k) == v for k, v in data.items()):
                return self.events.pop(i)
        while time.monotonic() < deadline:
            msg = self.recv(max(0.01, deadline - time.monotonic()))
            if "event" not in msg:
                raise AssertionError(f"unexpected reply while waiting for {name}: {msg}")
            if msg["event"] == name and all(msg.get("data", {}).get(k) == v
                                            for k, v in data.items()):
                return msg
            self.events.append(msg)
        raise AssertionError(f"no {name} event within {timeout} s")

    def wait_job(self, job_id: str, timeout: float = 60.0) -> dict:
        """Wait for the job to conclude; return its query-jobs entry and dismiss it."""
        self.wait_event("JOB_STATUS_CHANGE", timeout, id=job_id, status="concluded")
        info = [j for j in self.ok("query-jobs") if j["id"] == job_id][0]
        self.ok("job-dismiss", {"id": job_id})
        return info


def decode_message(line: bytes) -> dict:
    """Parse one message; QEMU writes non-finite doubles as C does (``inf``, ``nan``)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        text = re.sub(rb"(?<=[:\[,] )(-?)inf(?=[,}\]])", rb"\1Infinity", line)
        return json.loads(re.sub(rb"(?<=[:\[,] )-?nan(?=[,}\]])", rb"NaN", text))


def rss_kib(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))
