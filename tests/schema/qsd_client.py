"""qemu-storage-daemon with one QMP monitor, for oracle tests (tests/qmp_client.py talks)."""

from __future__ import annotations

import os
import tempfile

from tests.qmp_client import QmpClient
from tests.qsd import start_qsd


class QemuStorageDaemon:
    """qemu-storage-daemon with one QMP monitor, run in its own scratch directory."""

    def __init__(self, binary: str) -> None:
        self.workdir = tempfile.TemporaryDirectory(prefix="qmpd-qsd-")
        path = os.path.join(self.workdir.name, "qmp.sock")
        self.process = start_qsd(path, binary=binary)
        self.qmp = QmpClient(path, timeout=60.0, connect_timeout=10.0, negotiate=True)

    def execute(self, command: str, arguments: dict | None = None) -> dict:
        return self.qmp.cmd(command, arguments)

    def close(self) -> None:
        qmp = getattr(self, "qmp", None)
        if qmp is not None:
            qmp.close()
        self.process.terminate()
        self.process.wait(timeout=10)
        self.workdir.cleanup()
