"""qmpd beside qemu-storage-daemon 7.2, qemu-io and qemu-img on one image.

Each side must refuse what the other holds, in both directions, with QEMU's
lock texts; and key slots written by one implementation must open in the
other.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from tests.block.test_locks import held_bytes
from tests.integration.test_iotest_295 import (  # noqa: F401  (templates: a fixture)
    PASSPHRASES,
    REFUSALS,
    SECRET_IDS,
    Monitor,
    add_key,
    copy_image,
    templates,
)
from tests.oracles import require, run, run_qemu_img
from tests.qsd import start_qsd

pytestmark = pytest.mark.interop

SHARED_CR = 'Failed to get shared "consistent read" lock'
CALIBRATION_FLAKE = "Unable to get accurate CPU usage"


class Qsd:
    """A qemu-storage-daemon with one QMP monitor and the iotest secrets."""

    def __init__(self, workdir, *blockdevs: str) -> None:
        require("qemu-storage-daemon")
        sock = os.path.join(str(workdir), "qsd.sock")
        args = []
        for sid, data in zip(SECRET_IDS, PASSPHRASES):
            args += ["--object", f"secret,id={sid},data={data}"]
        for spec in blockdevs:
            args += ["--blockdev", spec]
        self.proc = start_qsd(sock, args, log_path=os.path.join(str(workdir), "qsd.log"))
        # commands run only once the command line's block devices are open
        self.mon = Monitor(sock)

    def amend(self, node: str, image, luks_options: dict) -> str | None:
        """x-blockdev-amend in qsd, retried when QEMU's PBKDF2 calibration flakes."""
        for _ in range(8):
            error = self.mon.amend(node, image, luks_options)
            if error is None or CALIBRATION_FLAKE not in error:
                return error
        raise AssertionError(f"qemu-storage-daemon kept failing: {error}")

    def stop(self) -> None:
        self.mon.close()
        self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def qsd_factory(tmp_path):
    started: list[Qsd] = []

    def start(*blockdevs: str) -> Qsd:
        workdir = tmp_path / f"qsd{len(started)}"
        workdir.mkdir()
        qsd = Qsd(workdir, *blockdevs)
        started.append(qsd)
        return qsd

    yield start
    for qsd in started:
        if qsd.proc.poll() is None:
            qsd.stop()


@pytest.fixture
def qmpd(qmpd_daemon):
    """``start() -> (Monitor, process)`` of a qmpd with the iotest secrets."""
    monitors = []

    def start():
        sock, proc = qmpd_daemon()
        mon = Monitor(sock)
        mon.add_secrets()
        monitors.append(mon)
        return mon, proc

    yield start
    for mon in monitors:
        mon.close()


def qemu_io(image, *commands: str, read_only: bool = False) -> subprocess.CompletedProcess:
    require("qemu-io")
    args = ["qemu-io"] + (["-r"] if read_only else [])
    args += ["--object", f"secret,id=s0,data={PASSPHRASES[0]}", "--image-opts",
             image.image_opts()]
    for command in commands:
        args += ["-c", command]
    return run(args, check=False)


def lock_refusal(proc: subprocess.CompletedProcess, tool: str, image, text: str) -> None:
    """The tool failed with QEMU's lock text and its "another process" hint."""
    assert proc.returncode != 0
    assert f'{text}\nIs another process using the image [{image.path}]?\n' in \
        proc.stderr.decode(), proc.stderr.decode()
    assert proc.stderr.decode().startswith(f"{tool}: ")


# -- qemu-storage-daemon holds the image ---------------------------------------------------

def test_qsd_holding_raw_luks_refuses_qmpd_amend(qsd_factory, qmpd, templates, tmp_path):
    image, key = copy_image(templates, "luks", tmp_path)
    qsd = qsd_factory(image.keyval_blockdev("l0"))
    assert held_bytes(image.path) == {100}
    mon, _ = qmpd()
    mon.ok("blockdev-add", image.blockdev("testdev"))           # luks shares, as in QEMU
    before = image.digest()
    args = {"node-name": "testdev", "job-id": "job0", "options": image.amend_options(add_key(1))}
    for command in ("x-blockdev-amend", "blockdev-amend"):
        assert mon.error(command, args) == SHARED_CR
        assert mon.job_statuses("job0") == ["created", "null"]
    assert image.digest() == before
    # qsd lets go: qmpd can; then qsd opens with the key qmpd added
    qsd.mon.ok("blockdev-del", {"node-name": "l0"})
    assert mon.amend("testdev", image, add_key(1)) is None
    qsd.mon.ok("blockdev-add", image.blockdev("l1", SECRET_IDS[1]))
    assert image.unlockers(key) == {0, 1}


def test_qsd_holding_qcow2_refuses_qmpd_open(qsd_factory, qmpd, templates, tmp_path):
    image, _ = copy_image(templates, "qcow2", tmp_path)
    qsd = qsd_factory(image.keyval_blockdev("q0"))
    assert held_bytes(image.path) == {100, 101, 103, 201, 203}
    mon, _ = qmpd()
    assert mon.error("blockdev-add", image.blockdev("testdev")) == 'Failed to get "write" lock'
    assert mon.error("blockdev-add", image.blockdev("testdev", read_only=True)) == \
        'Failed to get shared "write" lock'
    assert mon.ok("query-named-block-nodes") == []
    qsd.mon.ok("blockdev-del", {"node-name": "q0"})
    mon.ok("blockdev-add", image.blockdev("testdev"))
    assert mon.amend("testdev", image, add_key(1)) is None


def test_qsd_keeps_its_lock_until_dismiss_qmpd_does_not(qsd_factory, qmpd, templates, tmp_path):
    """The measured difference: a concluded qsd amend job keeps the exclusive
    bytes until job-dismiss; qmpd gives them back when the update ends."""
    image, _ = copy_image(templates, "luks", tmp_path)
    qsd = qsd_factory(image.keyval_blockdev("l0"))
    mon, _ = qmpd()
    for _ in range(8):
        assert qsd.mon.ok("x-blockdev-amend", {"node-name": "l0", "job-id": "job0",
                                               "options": image.amend_options(add_key(1))}) == {}
        assert qsd.mon.job_statuses("job0")[-1] == "concluded"
        [job] = qsd.mon.ok("query-jobs")
        if CALIBRATION_FLAKE not in job.get("error", ""):
            break
        qsd.mon.ok("job-dismiss", {"id": "job0"})
        qsd.mon.job_statuses("job0", "null")
    assert "error" not in job
    assert held_bytes(image.path) == {100, 101, 200, 201}
    assert mon.error("blockdev-add", image.blockdev("testdev")) == \
        'Failed to get "consistent read" lock'
    qsd.mon.ok("job-dismiss", {"id": "job0"})
    assert held_bytes(image.path) == {100}
    qsd.mon.ok("blockdev-del", {"node-name": "l0"})
    mon.ok("blockdev-add", image.blockdev("testdev", SECRET_IDS[1]))
    # qmpd's own job: concluded, not dismissed, and qsd may open a second node
    assert mon.ok("x-blockdev-amend", {"node-name": "testdev", "job-id": "job0",
                                       "options": image.amend_options(add_key(2))}) == {}
    assert mon.job_statuses("job0")[-1] == "concluded"
    assert held_bytes(image.path) == {100}
    qsd.mon.ok("blockdev-add", image.blockdev("l1", SECRET_IDS[2]))


# -- qmpd holds the image -----------------------------------------------------------------

def test_qmpd_holding_qcow2_refuses_qemu_tools(qsd_factory, qmpd, templates, tmp_path):
    image, _ = copy_image(templates, "qcow2", tmp_path)
    mon, _ = qmpd()
    mon.ok("blockdev-add", image.blockdev("testdev"))
    assert held_bytes(image.path) == {100, 101, 103, 201, 203}
    lock_refusal(qemu_io(image, "write -P 0x11 0 4k"), "qemu-io", image,
                 'Failed to get "write" lock')
    lock_refusal(qemu_io(image, "read 0 4k", read_only=True), "qemu-io", image,
                 'Failed to get shared "write" lock')
    proc = run(["qemu-img", "check", "--object", f"secret,id=s0,data={PASSPHRASES[0]}",
                "--image-opts", image.image_opts()], check=False)
    lock_refusal(proc, "qemu-img", image, 'Failed to get shared "write" lock')
    require("qemu-storage-daemon")
    proc = run(["qemu-storage-daemon", "--object", f"secret,id=keysec0,data={PASSPHRASES[0]}",
                "--blockdev", image.keyval_blockdev("q0")], check=False, timeout=30)
    lock_refusal(proc, "qemu-storage-daemon", image, 'Failed to get "write" lock')
    # qmpd lets go: the tools may
    mon.ok("blockdev-del", {"node-name": "testdev"})
    assert held_bytes(image.path) == set()
    proc = run_qemu_img(["check", "--object", f"secret,id=s0,data={PASSPHRASES[0]}",
                         "--image-opts", image.image_opts()])
    assert b"No errors were found on the image." in proc.stdout
    proc = qemu_io(image, "write -P 0x11 64k 4k", "read -P 0x11 64k 4k", "read -P 0x5a 0 64k")
    assert proc.returncode == 0 and b"Pattern verification failed" not in proc.stdout
    qsd = qsd_factory(image.keyval_blockdev("q0"))
    assert len(qsd.mon.ok("query-named-block-nodes")) == 2


def test_qmpd_raw_luks_at_rest_shares_like_qemu(qmpd, templates, tmp_path):
    """At rest a raw LUKS node takes consistent read only and shares all, as
    QEMU's luks driver does: a qemu-io writer may work beside it."""
    image, key = copy_image(templates, "luks", tmp_path)
    mon, _ = qmpd()
    mon.ok("blockdev-add", image.blockdev("testdev"))
    assert held_bytes(image.path) == {100}
    proc = qemu_io(image, "write -P 0x22 64k 4k", "read -P 0x22 64k 4k")
    assert proc.returncode == 0 and b"Pattern verification failed" not in proc.stdout
    assert mon.amend("testdev", image, add_key(1)) is None
    assert image.unlockers(key) == {0, 1}


def _hold_in_update(proc: subprocess.Popen, path: str, timeout: float = 5.0) -> bool:
    """Stop ``proc`` (SIGSTOP) the moment it holds the exclusive bytes of an update.

    The window in which qmpd writes key slots is a few milliseconds; polling
    /proc/locks catches it, and the stop keeps it open for the assertions.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if 201 in held_bytes(path):
            os.kill(proc.pid, signal.SIGSTOP)
            if 201 in held_bytes(path):
                return True
            os.kill(proc.pid, signal.SIGCONT)   # stopped just after the window
    return False


def test_qmpd_updating_keys_locks_out_qemu(qmpd, templates, tmp_path):
    image, key = copy_image(templates, "luks", tmp_path)
    mon, proc = qmpd()
    mon.ok("blockdev-add", image.blockdev("testdev"))
    added = {0}
    try:
        # a very busy machine may let a window pass unseen: try a few updates
        for secret in (1, 2, 3):
            job_id = f"job{secret}"
            assert mon.ok("x-blockdev-amend", {
                "node-name": "testdev", "job-id": job_id,
                "options": image.amend_options(add_key(secret))}) == {}
            added.add(secret)
            if _hold_in_update(proc, image.path):
                break
            assert mon.run_job(job_id) is None
        else:
            pytest.fail("never saw the update's locks")
        assert held_bytes(image.path) == {100, 101, 200, 201}
        text = 'Failed to get "consistent read" lock'
        lock_refusal(qemu_io(image, "read 0 4k", read_only=True), "qemu-io", image, text)
        lock_refusal(qemu_io(image, "write 0 4k"), "qemu-io", image, text)
        require("qemu-storage-daemon")
        qsd = run(["qemu-storage-daemon", "--object",
                   f"secret,id=keysec0,data={PASSPHRASES[0]}",
                   "--blockdev", image.keyval_blockdev("l0")], check=False, timeout=30)
        lock_refusal(qsd, "qemu-storage-daemon", image, text)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    assert mon.run_job(job_id) is None
    assert held_bytes(image.path) == {100}
    assert qemu_io(image, "read -P 0x5a 0 64k", read_only=True).returncode == 0
    assert image.unlockers(key) == added


# -- key slots written by one, opened by the other ------------------------------------------

@pytest.mark.parametrize("fmt", ["luks", "qcow2"])
def test_keys_cross_between_qsd_and_qmpd(qsd_factory, qmpd, templates, tmp_path, fmt):
    image, key = copy_image(templates, fmt, tmp_path)
    qsd = qsd_factory()
    qsd.mon.ok("blockdev-add", image.blockdev("l0"))
    assert qsd.amend("l0", image, add_key(1)) is None
    qsd.mon.ok("blockdev-del", {"node-name": "l0"})
    # qmpd opens with qsd's key, adds one and erases the original
    mon, _ = qmpd()
    mon.ok("blockdev-add", image.blockdev("testdev", SECRET_IDS[1]))
    assert mon.amend("testdev", image, add_key(2)) is None
    assert mon.amend("testdev", image, {"state": "inactive",
                                        "old-secret": SECRET_IDS[0]}) is None
    mon.ok("blockdev-del", {"node-name": "testdev"})
    # qsd opens with qmpd's key, no longer with the erased one
    assert qsd.mon.error("blockdev-add", image.blockdev("l0", SECRET_IDS[0])) == \
        "Invalid password, cannot unlock any keyslot"
    qsd.mon.ok("blockdev-add", image.blockdev("l0", SECRET_IDS[2]))
    assert qsd.amend("l0", image, {"state": "inactive", "keyslot": 1}) is None
    qsd.mon.ok("blockdev-del", {"node-name": "l0"})
    mon.ok("blockdev-add", image.blockdev("testdev", SECRET_IDS[2]))
    assert mon.slots("testdev") == [2]
    assert image.unlockers(key) == {2}


def test_refusal_texts_match_qsd(qsd_factory, qmpd, templates, tmp_path):
    """The same refused amends on both daemons give the same job errors."""
    image, _ = copy_image(templates, "luks", tmp_path)
    qsd = qsd_factory()
    mon, _ = qmpd()
    answers = {}
    for name, monitor in (("qsd", qsd.mon), ("qmpd", mon)):
        monitor.ok("blockdev-add", image.blockdev("testdev"))
        answers[name] = [monitor.amend("testdev", image, options)
                         for options, _ in REFUSALS]
        monitor.ok("blockdev-del", {"node-name": "testdev"})
    assert answers["qsd"] == answers["qmpd"]
    assert None not in answers["qmpd"]
