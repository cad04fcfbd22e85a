"""Run qmpd as a subprocess in tests: one daemon per private socket, its log kept.

Theory of operation
-------------------
:class:`QmpdProcess` starts ``python -m qmpd`` (or any command that takes
qemu-storage-daemon's options, e.g. ``qemu-storage-daemon`` itself) in a
fresh short temporary directory (Unix socket paths are limited to 107
bytes, which pytest's tmp_path can exceed), which is also its working
directory, with one QMP monitor on ``qmpd.sock`` there, spelled as qsd
spells it (``--chardev socket,id=...,path=...,server=on,wait=off --monitor
chardev=...``). The daemon's stdout and stderr go to ``qmpd.log`` next to
the socket. :meth:`start` returns
once the socket accepts connections, or raises :class:`StartupError` with
the log if the daemon exits first or takes too long. :meth:`stop` sends
SIGTERM (SIGKILL after a timeout), keeps the log's text and removes the
directory it made.

The pytest fixtures built on it are in :mod:`qmpd.testing.pytest_plugin`,
which ``pip install qmpd`` registers with pytest (entry point ``pytest11``).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Self

if TYPE_CHECKING:  # pragma: no cover
    from qemu.qmp import QMPClient
    from qemu.qmp.legacy import QEMUMonitorProtocol

__all__ = ["QmpdProcess", "StartupError", "accepts", "default_command", "stop_process"]

#: How long a fresh daemon may take until its socket accepts.
STARTUP_TIMEOUT = 15.0
#: How long SIGTERM may take before SIGKILL.
STOP_TIMEOUT = 10.0


class StartupError(Exception):
    """The daemon exited, or did not accept, during start-up; ``log`` is its output."""

    def __init__(self, message: str, log: str) -> None:
        super().__init__(f"{message}\n--- daemon log ---\n{log}")
        self.log = log


def default_command() -> list[str]:
    """$QMPD_COMMAND (split as a shell would), else this Python's ``-m qmpd``."""
    text = os.environ.get("QMPD_COMMAND")
    return shlex.split(text) if text else [sys.executable, "-m", "qmpd"]


def accepts(path: str) -> bool:
    """True once a daemon accepts on ``path`` (a stale socket file does not)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def stop_process(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT) -> bool:
    """SIGTERM, then SIGKILL if it is not gone within ``timeout``; False if it had to be killed."""
    if proc.poll() is not None:
        return True
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return False


class QmpdProcess:
    """One daemon subprocess with a private QMP socket.

    ``args`` are added after the monitor options (``--object``, ``--blockdev``,
    ``--nbd-server``...); ``{dir}`` in them is replaced by the daemon's
    directory. ``command`` defaults to :func:`default_command`.
    """

    def __init__(
        self,
        args: Sequence[str] = (),
        *,
        command: Sequence[str] | None = None,
        workdir: str | os.PathLike | None = None,
        name: str = "qmpd",
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
        pretty: bool = False,
        startup_timeout: float = STARTUP_TIMEOUT,
    ) -> None:
        self.command = list(command) if command is not None else default_command()
        self.args = list(args)
        self.name = name
        self._own_dir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else None
        #: The daemon's working directory; None: its own directory.
        self.cwd = cwd
        self.env = env
        self.pretty = pretty
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None
        self.returncode: int | None = None
        self.killed = False
        self._log_text: str | None = None

    # -- paths --------------------------------------------------------------------
    @property
    def socket_path(self) -> str:
        assert self.workdir is not None, "not started"
        return str(self.workdir / f"{self.name}.sock")

    @property
    def log_path(self) -> Path:
        assert self.workdir is not None, "not started"
        return self.workdir / f"{self.name}.log"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def argv(self) -> list[str]:
        monitor = "chardev=qmp,pretty=on" if self.pretty else "chardev=qmp"
        extra = [a.replace("{dir}", str(self.workdir)) for a in self.args]
        return [
            *self.command,
            "--chardev",
            f"socket,id=qmp,path={self.socket_path},server=on,wait=off",
            "--monitor",
            monitor,
            *extra,
        ]

    # -- life -----------------------------------------------------------------------
    def start(self) -> Self:
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="qmpd-"))
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.workdir if self.cwd is None else self.cwd,
            )
        deadline = time.monotonic() + self.startup_timeout
        while not accepts(self.socket_path):
            code = self.process.poll()
            if code is not None:
                self.returncode = code
                raise StartupError(
                    f"{self.describe()} exited with {code} during start-up", self.log()
                )
            if time.monotonic() > deadline:
                self.stop()
                raise StartupError(
                    f"{self.describe()} did not accept on {self.socket_path} "
                    f"within {self.startup_timeout} s",
                    self.log(),
                )
            time.sleep(0.02)
        return self

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """Terminate (SIGTERM, SIGKILL after ``timeout``); the exit code. Idempotent."""
        if self.process is not None and self.returncode is None:
            self.killed = not stop_process(self.process, timeout)
            self.returncode = self.process.returncode
        if self.workdir is not None and self._log_text is None:
            self._log_text = self._read_log()
            if self._own_dir:
                shutil.rmtree(self.workdir, ignore_errors=True)
        return self.returncode

    def log(self) -> str:
        """Everything the daemon wrote to stdout and stderr so far."""
        return self._log_text if self._log_text is not None else self._read_log()

    def _read_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except (OSError, AssertionError):
            return ""

    def describe(self) -> str:
        return f"{Path(self.command[-1]).name} (pid {self.pid})"

    def __enter__(self) -> Self:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- clients ----------------------------------------------------------------------
    def connect_sync(self, negotiate: bool = True) -> QEMUMonitorProtocol:
        """A connected qemu.qmp.legacy.QEMUMonitorProtocol (negotiated by default)."""
        from qemu.qmp.legacy import QEMUMonitorProtocol

        qmp = QEMUMonitorProtocol(self.socket_path)
        qmp.connect(negotiate=negotiate)
        return qmp

    async def connect(self, name: str = "test") -> QMPClient:
        """A qemu.qmp.QMPClient connected in the running asyncio loop."""
        from qemu.qmp import QMPClient

        client = QMPClient(name)
        await client.connect(self.socket_path)
        return client
