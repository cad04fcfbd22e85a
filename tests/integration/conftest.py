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

#: How long a fresh daemon may take to create its socket.
STARTUP_TIMEOUT = 10.0

StartDaemon = Callable[..., tuple[str, subprocess.Popen]]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def qmpd_daemon() -> Iterator[StartDaemon]:
    """Factory: ``start(*daemon_args, workdir=None) -> (socket_path, process)``.

    Starts ``python -m qmpd --socket PATH *daemon_args`` and returns once the
    socket exists. The socket lives in ``workdir`` (a fresh short temporary
    directory by default: Unix socket paths are limited to 107 bytes, which
    pytest's tmp_path can exceed). The daemon's stdout and stderr go to
    ``qmpd.log`` next to the socket and are shown if it dies during start-up.
    Every daemon started is terminated at teardown.
    """
    started: list[subprocess.Popen] = []
    own_dirs: list[str] = []

    def start(*daemon_args: str, workdir: str | os.PathLike | None = None
              ) -> tuple[str, subprocess.Popen]:
        if workdir is None:
            workdir = tempfile.mkdtemp(prefix="qmpd-")
            own_dirs.append(workdir)
        workdir = str(workdir)
        sock = os.path.join(workdir, f"qmpd-{len(started)}.sock")
        log_path = Path(workdir) / f"qmpd-{len(started)}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "qmpd", "--socket", sock, *daemon_args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        started.append(proc)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not os.path.exists(sock):
            if proc.poll() is not None:
                pytest.fail(f"qmpd exited with {proc.returncode} before creating its socket:\n"
                            f"{log_path.read_text(errors='replace')}")
            if time.monotonic() > deadline:
                pytest.fail(f"qmpd did not create {sock} within {STARTUP_TIMEOUT} s:\n"
                            f"{log_path.read_text(errors='replace')}")
            time.sleep(0.02)
        return sock, proc

    try:
        yield start
    finally:
        for proc in started:
            _stop(proc)
        for d in own_dirs:
            shutil.rmtree(d, ignore_errors=True)
