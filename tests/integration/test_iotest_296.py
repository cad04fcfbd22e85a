"""QEMU iotest 296 (key management versus image sharing) with two qmpd processes.

QEMU 7.2 takes the amend job's permissions when the command creates the job,
so a lock conflict is the reply of x-blockdev-amend itself (the job goes
created -> null); qmpd answers the same way. Raw LUKS only, as in QEMU: a
read-write qcow2 node shares nothing with another writer in the first place.
"""

from __future__ import annotations

import pytest

from tests.block.test_locks import held_bytes
from tests.integration.test_iotest_295 import (PASSPHRASES, SECRET_IDS, Monitor, add_key,
                                               copy_image, templates)  # noqa: F401 (fixture)
from tests.oracles import require, run

pytestmark = pytest.mark.interop

SHARED_CR = 'Failed to get shared "consistent read" lock'


@pytest.fixture
def two(qmpd_daemon, templates, tmp_path):  # noqa: F811 (the imported fixture)
    """Two qmpd processes with the secrets, and a raw LUKS image keyed with hunter0."""
    image, key = copy_image(templates, "luks", tmp_path)
    monitors = []
    for _ in range(2):
        sock, _proc = qmpd_daemon()
        mon = Monitor(sock)
        mon.add_secrets(4)
        monitors.append(mon)
    yield monitors[0], monitors[1], image, key
    for mon in monitors:
        mon.close()


def refused_amend(mon: Monitor, image, new_secret: int) -> str:
    """x-blockdev-amend must fail in its reply; the job is born and dies (null)."""
    args = {"node-name": "testdev", "job-id": "job0",
            "options": image.amend_options(add_key(new_secret))}
    desc = mon.error("x-blockdev-amend", args)
    assert mon.job_statuses("job0") == ["created", "null"]
    assert mon.ok("query-jobs") == []
    return desc


def reopen(mon: Monitor, image, *, read_only: bool) -> None:
    """blockdev-reopen as iotest 296 does it: the file child given inline again."""
    options = image.blockdev("testdev", read_only=read_only)
    mon.ok("blockdev-reopen", {"options": [options]})


def test_two_writers_neither_can_update_keys(two):
    vm1, vm2, image, key = two
    vm1.ok("blockdev-add", image.blockdev("testdev"))
    assert vm1.amend("testdev", image, add_key(1)) is None
    vm2.ok("blockdev-add", image.blockdev("testdev"))
    before = image.digest()
    assert refused_amend(vm1, image, 2) == SHARED_CR
    assert refused_amend(vm2, image, 2) == SHARED_CR
    assert image.digest() == before
    # VM1 goes away: VM2 can
    vm1.ok("blockdev-del", {"node-name": "testdev"})
    assert vm2.amend("testdev", image, add_key(2)) is None
    assert image.unlockers(key) == {0, 1, 2}
    # qemu-img cannot amend an image a qmpd holds
    require("qemu-img")
    proc = run(["qemu-img", "amend", "--object", f"secret,id=s0,data={PASSPHRASES[0]}",
                "--object", f"secret,id=s3,data={PASSPHRASES[3]}",
                "-o", "state=active,new-secret=s3,iter-time=10", "--image-opts",
                image.image_opts()], check=False)
    assert proc.returncode != 0
    assert proc.stderr.decode().startswith(f"qemu-img: {SHARED_CR}\n"
                                           "Is another process using the image [")
    vm2.ok("blockdev-del", {"node-name": "testdev"})
    assert held_bytes(image.path) == set()
    assert image.unlockers(key) == {0, 1, 2}


def test_read_only_opener_blocks_the_writer(two):
    vm1, vm2, image, key = two
    vm1.ok("blockdev-add", image.blockdev("testdev", read_only=True))
    vm2.ok("blockdev-add", image.blockdev("testdev"))
    before = image.digest()
    # VM1 can't add a key since its node is read-only (checked after the job exists)
    assert refused_amend(vm1, image, 2) == "Block node is read-only"
    # VM2 can't, since VM1 has the image open
    assert refused_amend(vm2, image, 2) == SHARED_CR
    # VM1 reopens read-write (the implicit file child follows) and still can't
    reopen(vm1, image, read_only=False)
    assert [n["ro"] for n in vm1.ok("query-named-block-nodes")] == [False, False]
    assert refused_amend(vm1, image, 2) == SHARED_CR
    assert image.digest() == before
    # VM2 goes away: VM1 now can
    vm2.ok("blockdev-del", {"node-name": "testdev"})
    assert vm1.amend("testdev", image, add_key(2)) is None
    assert image.unlockers(key) == {0, 2}
    # and back to read-only: amend refused again, the write lock is gone
    reopen(vm1, image, read_only=True)
    assert [n["ro"] for n in vm1.ok("query-named-block-nodes")] == [True, True]
    assert refused_amend(vm1, image, 3) == "Block node is read-only"
    assert held_bytes(image.path) == {100}


def test_write_lock_released_when_the_job_ends_not_at_dismiss(two):
    vm1, vm2, image, key = two
    vm1.ok("blockdev-add", image.blockdev("testdev"))
    assert vm1.ok("x-blockdev-amend", {"node-name": "testdev", "job-id": "job0",
                                       "options": image.amend_options(add_key(1))}) == {}
    assert vm1.job_statuses("job0")[-1] == "concluded"
    # the job is concluded but not dismissed: the exclusive bytes are gone already
    assert [j["status"] for j in vm1.ok("query-jobs")] == ["concluded"]
    assert held_bytes(image.path) == {100}
    # a second process can open the image read-write right away
    vm2.ok("blockdev-add", image.blockdev("testdev", SECRET_IDS[1]))
    assert "error" not in vm1.ok("query-jobs")[0]
    vm1.ok("job-dismiss", {"id": "job0"})
    vm1.ok("blockdev-del", {"node-name": "testdev"})
    assert vm2.amend("testdev", image, add_key(2)) is None
    assert image.unlockers(key) == {0, 1, 2}


def test_node_of_an_undismissed_job_is_in_use(two):
    vm1, _, image, _ = two
    vm1.ok("blockdev-add", image.blockdev("testdev"))
    assert vm1.ok("x-blockdev-amend", {"node-name": "testdev", "job-id": "job0",
                                       "options": image.amend_options(add_key(1))}) == {}
    assert vm1.job_statuses("job0")[-1] == "concluded"
    assert vm1.error("blockdev-del", {"node-name": "testdev"}) == \
        "Block device testdev is in use"
    vm1.ok("job-dismiss", {"id": "job0"})
    assert vm1.ok("blockdev-del", {"node-name": "testdev"}) == {}


def test_qcow2_second_writer_cannot_even_open(qmpd_daemon, templates, tmp_path):  # noqa: F811
    image, key = copy_image(templates, "qcow2", tmp_path)
    monitors = [Monitor(qmpd_daemon()[0]) for _ in range(2)]
    for mon in monitors:
        mon.add_secrets(2)
    vm1, vm2 = monitors
    vm1.ok("blockdev-add", image.blockdev("testdev"))
    assert held_bytes(image.path) == {100, 101, 103, 201, 203}
    assert vm2.error("blockdev-add", image.blockdev("testdev")) == 'Failed to get "write" lock'
    assert vm2.error("blockdev-add", image.blockdev("testdev", read_only=True)) == \
        'Failed to get shared "write" lock'
    assert vm1.amend("testdev", image, add_key(1)) is None
    vm1.ok("blockdev-del", {"node-name": "testdev"})
    vm2.ok("blockdev-add", image.blockdev("testdev", SECRET_IDS[1]))
    assert image.unlockers() == {0, 1}
    for mon in monitors:
        mon.close()


def test_read_only_qcow2_amend_fails_at_the_write(qmpd_daemon, templates, tmp_path):  # noqa: F811
    """QEMU's qcow2 driver has no amend pre-run: the job starts, checks and
    unlocks, and only its first header write is refused (with QEMU's text)."""
    image, key = copy_image(templates, "qcow2", tmp_path)
    mon = Monitor(qmpd_daemon()[0])
    mon.add_secrets(2)
    mon.ok("blockdev-add", image.blockdev("testdev", read_only=True))
    before = image.digest()
    assert mon.amend("testdev", image, add_key(1, keyslot=8)) == \
        "Invalid keyslot 8 specified, must be between 0 and 7"
    assert mon.amend("testdev", image, add_key(1)) == \
        "Could not read encryption header: Operation not permitted"
    assert image.digest() == before
    assert image.unlockers() == {0}
    mon.close()
