"""Fixtures that run qmpd as a real subprocess on a Unix socket."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.processes import accepts, stop

#: How long a fresh daemon may take to create its socket.
STARTUP_TIMEOUT = 10.0

StartDaemon = Callable[..., tuple[str, subprocess.Popen]]


class QmpdLauncher:
    """Starts ``python -m qmpd --socket PATH ...`` processes and stops them all."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []
        self.own_dirs: list[str] = []

    def start(self, *daemon_args: str, workdir: str | os.PathLike | None = None
              ) -> tuple[str, subprocess.Popen]:
        if workdir is None:
            workdir = tempfile.mkdtemp(prefix="qmpd-")
            self.own_dirs.append(workdir)
        workdir = str(workdir)
        n = len(self.started)
        sock = os.path.join(workdir, f"qmpd-{n}.sock")
        log_path = Path(workdir) / f"qmpd-{n}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "qmpd", "--socket", sock, *daemon_args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        self.started.append(proc)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not accepts(sock):
            if proc.poll() is not None:
                pytest.fail(f"qmpd exited with {proc.returncode} before creating its socket:\n"
                            f"{log_path.read_text(errors='replace')}")
            if time.monotonic() > deadline:
                pytest.fail(f"qmpd did not create {sock} within {STARTUP_TIMEOUT} s:\n"
                            f"{log_path.read_text(errors='replace')}")
            time.sleep(0.02)
        return sock, proc

    def close(self) -> None:
        for proc in self.started:
            stop(proc)
        for d in self.own_dirs:
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def qmpd_daemon() -> Iterator[StartDaemon]:
    """Factory: ``start(*daemon_args, workdir=None) -> (socket_path, process)``.

    Starts ``python -m qmpd --socket PATH *daemon_args`` and returns once the
    socket exists. The socket lives in ``workdir`` (a fresh short temporary
    directory by default: Unix socket paths are limited to 107 bytes, which
    pytest's tmp_path can exceed). The daemon's stdout and stderr go to
    ``qmpd-N.log`` next to the socket and are shown if it dies during
    start-up. Every daemon started is terminated at teardown.
    """
    launcher = QmpdLauncher()
    try:
        yield launcher.start
    finally:
        launcher.close()


@pytest.fixture(scope="module")
def shared_qmpd_daemon() -> Iterator[Callable[[], str]]:
    """``get() -> socket_path`` of one plain qmpd shared by a module's tests.

    For tests that only open their own connection and leave no state behind;
    restarted if an earlier test made it exit.
    """
    launcher = QmpdLauncher()
    current: list[tuple[str, subprocess.Popen]] = []

    def get() -> str:
        if not current or current[0][1].poll() is not None:
            current[:] = [launcher.start()]
        return current[0][0]

    try:
        yield get
    finally:
        launcher.close()
