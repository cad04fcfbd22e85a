"""A hostile slot the passphrase does not need must cost nothing once the open is done.

Slot 0 opens with the passphrase; slot 1 claims two billion PBKDF2
iterations (minutes of work). QEMU tries slots in order and never computes
slot 1. Whatever strategy qmpd uses, once ``blockdev-add`` has answered no
thread may keep computing slot 1: the daemon would burn a core per such
open and its exit would wait for them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import pytest

from tests.reliability.launch import start_qmpd
from tests.qmp_client import QmpClient
from tests.reliability.test_hostile_images import HUGE_ITERATIONS, P0, _forge_iterations, _make_luks


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture
def workdir():
    path = tempfile.mkdtemp(prefix="qmpd-hs-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_unneeded_hostile_slot_costs_nothing_after_the_open(workdir, figures):
    image = os.path.join(workdir, "img.luks")
    _make_luks(image)
    _forge_iterations(image, 1, HUGE_ITERATIONS)
    sock = os.path.join(workdir, "q.sock")
    proc = start_qmpd(sock, os.path.join(workdir, "q.log"), "--object", f"secret,id=s0,data={P0}")
    try:
        with QmpClient(sock, timeout=30) as q:
            q.negotiate()
            start = time.monotonic()
            q.ok("blockdev-add", {"driver": "luks", "node-name": "d0", "key-secret": "s0",
                                  "file": {"driver": "file", "filename": image}})
            took = time.monotonic() - start
            cpu_before = _cpu_seconds(proc.pid)
            time.sleep(1.0)
            burnt = _cpu_seconds(proc.pid) - cpu_before
        figures("open beside a 2e9-iteration slot: answer (s) / CPU burnt in the next second",
                f"{took:.3f} / {burnt:.2f}")
        assert took < 5
        assert burnt < 0.3, f"{burnt:.2f} s of CPU in 1 s after the open: slot 1 still computing"
        proc.terminate()
        proc.wait(3)
    finally:
        proc.kill()
        proc.wait()
