"""SIGKILL at random moments during LUKS2 key add, erase and forced overwrite.

The LUKS2 sibling of test_sudden_death.py. The template is cryptsetup's
(``luksFormat --type luks2``, P0 in keyslot 0), P1 added by qmpd in
keyslot 1, 1 MiB of 0x5a written through qmpd. Each round copies it,
starts qmpd, starts an amend whose new keyslot is Argon2id with a 100-300
ms target (so calibration and derivation take a while) and kills the daemon
after a random delay. Then, on the image as the kill left it:

- each metadata copy on its own (the other's magic cleared in a copy of the
  image), when qmpd's reader finds it sound: every passphrase the
  operation does not remove unlocks it, to the same volume key -- so
  whichever copy a reader picks, nothing is lost;
- cryptsetup (on a copy: it repairs what it opens) unlocks those
  passphrases and dumps the same volume key;
- qmpd opens the image read-write (no stale lock) and the data reads back.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import time

import pytest
import trio

from qmpd.crypto.errors import CryptoError
from qmpd.crypto.luks import MemoryImageIO
from qmpd.crypto.luks.luks2_header import MAGIC_PRIMARY, MAGIC_SECONDARY, read_luks2
from qmpd.crypto.luks.luks2_volume import open_luks2_volume
from qmpd.block import blockdev
from qmpd.block.graph import BlockGraph
from tests.block.graph_peer import Secrets
from tests.oracles import cryptsetup_unlocks, cryptsetup_volume_key, require, run
from tests.qmp_client import QmpClient
from tests.reliability.launch import stop
from tests.reliability.test_sudden_death import P0, P1, _messages_received, _restart_reopens
from tests.reliability.test_sudden_death import workdir as workdir  # noqa: F401 (fixture)

pytestmark = pytest.mark.interop

#: operation -> (amend options, passphrases that must survive)
OPERATIONS = {
    "add": (lambda t: {"state": "active", "new-secret": "s2", "iter-time": t,
                       "pbkdf-memory": 16384, "pbkdf-parallel": 1}, [P0, P1]),
    "erase": (lambda t: {"state": "inactive", "old-secret": "s1"}, [P0]),
    "force-overwrite": (lambda t: {"state": "active", "new-secret": "s2", "keyslot": 1,
                                   "iter-time": t, "pbkdf-memory": 16384,
                                   "pbkdf-parallel": 1}, [P0]),
}


def _node(image: str) -> dict:
    return {"driver": "luks", "node-name": "d0", "key-secret": "s0",
            "file": {"driver": "file", "filename": image}}


async def _in_process(image: str, work) -> None:
    """Open the image in this process's own block layer (P0) and run ``work(node)``."""
    graph = BlockGraph(Secrets({"s0": P0}))
    try:
        await blockdev.add(graph, _node(image))
        await work(graph.find("d0"))
    finally:
        await graph.close_all()


@pytest.fixture(scope="module")
def template(workdir):  # noqa: F811
    require("cryptsetup")
    image = workdir.file("template.luks2")
    with open(image, "wb") as f:
        f.truncate(18 << 20)
    run(["cryptsetup", "luksFormat", "--type", "luks2", "--batch-mode", "--key-file", "-",
         "--pbkdf", "argon2id", "--pbkdf-memory", "1024", "--pbkdf-force-iterations", "4",
         "--pbkdf-parallel", "1", image], input=P0.encode())
    daemon = workdir.daemon()
    try:
        with QmpClient(workdir.sock) as q:
            q.negotiate()
            q.ok("blockdev-add", _node(image))
            q.ok("blockdev-amend", {"job-id": "add1", "node-name": "d0", "options": {
                "driver": "luks", "state": "active", "new-secret": "s1", "keyslot": 1,
                "iter-time": 10, "pbkdf-memory": 1024, "pbkdf-parallel": 1}})
            assert "error" not in q.wait_job("add1")
            q.ok("blockdev-del", {"node-name": "d0"})
    finally:
        stop(daemon)

    async def write(node) -> None:
        await node.write(0, b"\x5a" * (1 << 20))
        await node.flush_all()
    trio.run(_in_process, image, write)
    return image, cryptsetup_volume_key(image, P0.encode())


def copy_views(data: bytes, hdr_size: int) -> dict[str, bytes]:
    """The image as is, and with only the primary or only the secondary copy."""
    primary_only = bytearray(data)
    primary_only[hdr_size:hdr_size + 6] = bytes(6)
    secondary_only = bytearray(data)
    secondary_only[0:6] = bytes(6)
    assert data[0:6] == MAGIC_PRIMARY and data[hdr_size:hdr_size + 6] == MAGIC_SECONDARY
    return {"as is": data, "primary": bytes(primary_only), "secondary": bytes(secondary_only)}


def check_every_copy(image: str, survivors: list[str], volume_key: bytes) -> int:
    """Each sound copy opens with every survivor to the same key; the count of sound ones."""
    data = open(image, "rb").read()
    hdr_size = int.from_bytes(data[8:16], "big")
    sound = 0
    for view, raw in copy_views(data, hdr_size).items():
        try:
            read_luks2(MemoryImageIO(raw).read)
        except CryptoError:
            assert view != "as is", "neither copy is sound"
            continue
        sound += view != "as is"
        for passphrase in survivors:
            with open_luks2_volume(MemoryImageIO(raw), passphrase.encode()) as volume:
                assert bytes(volume.volume_key) == volume_key, (view, passphrase)
    assert sound >= 1
    return sound


def cryptsetup_agrees(workdir, image: str, survivors: list[str], volume_key: bytes) -> None:
    scratch = workdir.file("cryptsetup-scratch.img")
    shutil.copyfile(image, scratch)
    for passphrase in survivors:
        assert cryptsetup_unlocks(scratch, passphrase.encode()), passphrase
    assert cryptsetup_volume_key(scratch, P0.encode()) == volume_key


def data_reads_back(image: str) -> None:
    async def read(node) -> None:
        assert await node.read(0, 1 << 20) == b"\x5a" * (1 << 20)
    trio.run(_in_process, image, read)


def _kill_round(workdir, template, op: str, rng: random.Random) -> tuple[bool, int]:  # noqa: F811
    source, volume_key = template
    image = workdir.file("victim.luks2")
    shutil.copyfile(source, image)
    make_options, survivors = OPERATIONS[op]
    iter_time = rng.randint(100, 300)
    daemon = workdir.daemon()
    q = QmpClient(workdir.sock)
    q.negotiate()
    q.ok("blockdev-add", _node(image))
    args = {"job-id": "victim", "node-name": "d0",
            "options": {"driver": "luks", **make_options(iter_time)}}
    if op == "force-overwrite":
        args["force"] = True
    q.ok("blockdev-amend", args)
    time.sleep(rng.uniform(0, 1.5 * iter_time / 1000))
    os.kill(daemon.pid, signal.SIGKILL)
    daemon.wait()
    inside = b'"concluded"' not in _messages_received(q)
    q.close()
    sound = check_every_copy(image, survivors, volume_key)
    cryptsetup_agrees(workdir, image, survivors, volume_key)
    data_reads_back(image)
    _restart_reopens(workdir, "luks", image)
    return inside, sound


def test_sigkill_during_luks2_amend(workdir, template, scale, figures):  # noqa: F811
    rng = random.Random("kill-luks2")
    kills = inside = both_sound = 0
    for _ in range(scale(1, 40)):
        for op in OPERATIONS:
            landed, sound = _kill_round(workdir, template, op, rng)
            inside += landed
            both_sound += sound == 2
            kills += 1
    figures("SIGKILL during LUKS2 amend: kills survived (inside the job, both copies sound)",
            f"{kills} ({inside}, {both_sound})")
    assert inside > 0

