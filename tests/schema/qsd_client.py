"""A minimal blocking QMP client for qemu-storage-daemon, for oracle tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import time


class QemuStorageDaemon:
    """qemu-storage-daemon with one QMP monitor, run in its own scratch directory."""

    def __init__(self, binary: str) -> None:
        self.workdir = tempfile.TemporaryDirectory(prefix="qmpd-qsd-")
        path = os.path.join(self.workdir.name, "qmp.sock")
        self.process = subprocess.Popen(
            [binary, "--chardev", f"socket,id=c0,path={path},server=on,wait=off",
             "--monitor", "chardev=c0"],
            cwd=self.workdir.name, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not os.path.exists(path):
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.close()
                raise RuntimeError("qemu-storage-daemon did not open its QMP socket")
            time.sleep(0.02)
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.stream = self.sock.makefile("rwb")
        json.loads(self.stream.readline())  # greeting
        self.execute("qmp_capabilities")

    def execute(self, command: str, arguments: dict | None = None) -> dict:
        request: dict = {"execute": command}
        if arguments is not None:
            request["arguments"] = arguments
        self.stream.write(json.dumps(request).encode() + b"\n")
        self.stream.flush()
        while True:
            reply = json.loads(self.stream.readline())
            if "event" not in reply:
                return reply

    def close(self) -> None:
        try:
            self.sock.close()
        except AttributeError:
            pass
        self.process.terminate()
        self.process.wait(timeout=10)
        self.workdir.cleanup()
