"""Daemon subprocesses in tests: is it listening yet, and stopping it
(qmpd.testing's, which the pytest plugin uses too)."""

from __future__ import annotations

import subprocess

from qmpd.testing import accepts, stop_process

__all__ = ["accepts", "stop"]


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it is not gone within 5 s."""
    stop_process(proc, timeout=5)
