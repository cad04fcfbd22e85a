"""Start qmpd variants as subprocesses for the reliability tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from tests.processes import accepts, stop  # noqa: F401  (stop: re-exported to the tests)

WORKTREE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def wait_for_socket(path: str, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """Until the daemon accepts (a stale socket file from a killed one may exist)."""
    deadline = time.monotonic() + timeout
    while not accepts(path):
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited with {proc.returncode} before listening")
        if time.monotonic() > deadline:
            raise AssertionError(f"no socket {path} after {timeout} s")
        time.sleep(0.01)


def start_limited(path: str, log_path: str, **limits) -> subprocess.Popen:
    """A daemon with the given Limits; the caller stops it."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.reliability.limited_daemon", path, json.dumps(limits)],
            cwd=WORKTREE, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    wait_for_socket(path, proc)
    return proc


def start_qmpd(path: str, log_path: str, *args: str, cwd: str | None = None) -> subprocess.Popen:
    """``python -m qmpd --socket PATH *args`` (logs to ``log_path``)."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "qmpd", "--socket", path, *args],
                                cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT)
    wait_for_socket(path, proc)
    return proc
