"""A tiny synchronous QMP client on the standard library, for the examples.

Real clients (qemu.qmp, libvirt, qmp-shell) work unchanged; this one exists
so the Quick start needs nothing but python3 and prints every message as
it crosses the wire.
"""

from __future__ import annotations

import json
import socket


class LineClient:
    def __init__(self, path: str, *, show=print) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")
        self.show = show
        self.events: list[dict] = []
        self.greeting = self._read()
        self.show(f"<- {json.dumps(self.greeting)}")

    def _read(self) -> dict:
        line = self.file.readline()
        if not line:
            raise ConnectionError("qmpd closed the connection")
        return json.loads(line)

    def execute(self, command: str, arguments: dict | None = None, *, quiet: bool = False) -> dict:
        """Send a command; return its reply (events that arrive meanwhile are kept)."""
        message = {"execute": command}
        if arguments is not None:
            message["arguments"] = arguments
        if not quiet:
            self.show(f"-> {json.dumps(message)}")
        self.sock.sendall(json.dumps(message).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                if not quiet:
                    self.show(f"<- {json.dumps(reply)}")
                continue
            if not quiet:
                self.show(f"<- {json.dumps(reply)}")
            return reply

    def wait_event(self, name: str, match: dict | None = None) -> dict:
        """Wait for an event (checking those already received first)."""
        while True:
            for i, event in enumerate(self.events):
                if event["event"] == name and all(
                    event.get("data", {}).get(k) == v for k, v in (match or {}).items()
                ):
                    return self.events.pop(i)
            event = self._read()
            self.show(f"<- {json.dumps(event)}")
            self.events.append(event)

    def run_job(self, command: str, arguments: dict) -> dict:
        """Start a job, wait until it concludes, dismiss it; return its query-jobs entry."""
        reply = self.execute(command, arguments)
        if "error" in reply:
            return {"error": reply["error"]["desc"]}
        job_id = arguments["job-id"]
        self.wait_event("JOB_STATUS_CHANGE", {"id": job_id, "status": "concluded"})
        info = next(j for j in self.execute("query-jobs")["return"] if j["id"] == job_id)
        self.execute("job-dismiss", {"id": job_id})
        return info

    def close(self) -> None:
        self.file.close()
        self.sock.close()
