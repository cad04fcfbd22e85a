"""Daemon subprocesses in tests: is it listening yet, and stopping it."""

from __future__ import annotations

import socket
import subprocess


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


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it is not gone within 5 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
