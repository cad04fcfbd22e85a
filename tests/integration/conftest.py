"""Fixtures that run qmpd as a real subprocess on a Unix socket.

They predate qmpd's pytest plugin (qmpd/testing) and keep their interface
(``start(*args) -> (socket_path, process)``); the daemons are started and
stopped by the plugin's QmpdProcess.
"""

from __future__ import annotations

import os
import subprocess
from typing import Callable, Iterator

import pytest

from qmpd.testing import QmpdProcess, StartupError

#: How long a fresh daemon may take to create its socket.
STARTUP_TIMEOUT = 30.0

StartDaemon = Callable[..., tuple[str, subprocess.Popen]]


class QmpdLauncher:
    """Starts qmpd processes (qmpd.testing.QmpdProcess, as the pytest plugin does)
    with the caller's daemon arguments and stops them all."""

    def __init__(self) -> None:
        self.started: list[QmpdProcess] = []

    def start(self, *daemon_args: str, workdir: str | os.PathLike | None = None
              ) -> tuple[str, subprocess.Popen]:
        daemon = QmpdProcess(daemon_args, workdir=workdir, name=f"qmpd-{len(self.started)}",
                             cwd=os.getcwd(), startup_timeout=STARTUP_TIMEOUT)
        self.started.append(daemon)
        try:
            daemon.start()
        except StartupError as exc:
            pytest.fail(str(exc))
        assert daemon.process is not None
        return daemon.socket_path, daemon.process

    def close(self) -> None:
        for daemon in self.started:
            daemon.stop(timeout=5)


@pytest.fixture
def qmpd_daemon() -> Iterator[StartDaemon]:
    """Factory: ``start(*daemon_args, workdir=None) -> (socket_path, process)``.

    Starts ``python -m qmpd`` with a QMP monitor on a Unix socket and
    ``daemon_args`` and returns once the socket accepts. The socket lives in ``workdir`` (a fresh short temporary
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


def pytest_addoption(parser: pytest.Parser) -> None:
    """test_differential_qsd.py: which seeded sequences to run against qsd."""
    parser.addoption("--diff-seed", type=int, default=20240612,
                     help="first seed of the differential sequences against qsd")
    parser.addoption("--diff-count", type=int, default=3,
                     help="how many differential sequences to run")
