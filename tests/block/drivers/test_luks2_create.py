"""blockdev-create with luks-version 2 (raw luks and qcow2's encrypt), and
amend of what it made: cryptsetup is the oracle for the raw images.

Small KDF costs throughout (iter-time 10 ms, 64 KiB of Argon2 memory, one
lane) keep every create and unlock to milliseconds.
"""

from __future__ import annotations

import os

import pytest
import trio

from qmpd.block import amend, query
from qmpd.block.drivers import qcow2_metadata as qcow2
from qmpd.errors import QMPError
from tests.block.drivers.datapath_helpers import (
    PASSPHRASE, MiB, create_image, file_ref, luks_node, opened, qcow2_node)
from tests.oracles import cryptsetup_volume_key, require, run

SMALL_ARGON2 = {"pbkdf": "argon2id", "pbkdf-memory": 64, "pbkdf-parallel": 1}


class _NoProgress:
    def set(self, current: int, total: int) -> None:
        pass


def cryptsetup(*args: object, input: bytes | None = None) -> str:
    require("cryptsetup")
    return run(["cryptsetup", *map(str, args)], input=input).stdout.decode()


def luks2_create(path: str, size: int, **extra) -> None:
    trio.run(create_image, {"driver": "luks", "file": file_ref(path), "size": size,
                            "key-secret": "s0", "iter-time": 10, "luks-version": 2, **extra})


def test_raw_luks2_create_is_cryptsetups(tmp_path):
    image = str(tmp_path / "new.img")
    luks2_create(image, 4 * MiB, **SMALL_ARGON2, **{"sector-size": 4096, "label": "vm-disk"})
    assert os.path.getsize(image) == 16 * MiB + 4 * MiB
    dump = cryptsetup("luksDump", image)
    assert "Version:       \t2" in dump
    assert "Label:         \tvm-disk" in dump
    assert "sector: 4096 [bytes]" in dump
    assert "PBKDF:      argon2id" in dump and "Memory:     64" in dump
    cryptsetup("open", "--test-passphrase", "--key-file", "-", image,
               input=PASSPHRASE.encode())
    key = cryptsetup_volume_key(image, PASSPHRASE.encode())
    data = os.urandom(8192)

    async def main() -> None:
        async with opened(luks_node("l", image)) as (graph, [node]):
            assert bytes(node.volume.volume_key) == key
            assert node.length() == 4 * MiB and node.request_alignment == 4096
            await node.write(4096, data)
            info = node.volume.info()
            assert (info["luks-version"], info["label"], info["sector-size"]) == (
                2, "vm-disk", 4096)
            assert info["payload-offset"] == 16 * MiB
            [entry] = [e for e in query.named_block_nodes(graph) if e["node-name"] == "l"]
            assert entry["image"]["format-specific"]["data"] == info
        async with opened(luks_node("l", image)) as (_graph, [node]):
            assert await node.read(4096, 8192) == data
    trio.run(main)


def test_raw_luks2_create_pbkdf2_default_sector(tmp_path):
    image = str(tmp_path / "new.img")
    luks2_create(image, MiB, pbkdf="pbkdf2")
    dump = cryptsetup("luksDump", image)
    assert "PBKDF:      pbkdf2" in dump and "sector: 512 [bytes]" in dump
    cryptsetup("open", "--test-passphrase", "--key-file", "-", image,
               input=PASSPHRASE.encode())


@pytest.mark.parametrize("options, text", [
    ({"sector-size": 4096}, "Parameter 'sector-size' needs luks-version 2 "
                            "(LUKS1 has no such field)"),
    ({"pbkdf": "argon2id"}, "Requested PBKDF type is not supported for LUKS1."),
    ({"luks-version": 3}, "Unsupported LUKS version 3 (1 or 2)"),
    ({"luks-version": 2, "sector-size": 1024},
     "Unsupported encryption sector size 1024, must be 512 or 4096"),
    ({"luks-version": 2, "sector-size": 4096, "size": MiB + 512},
     "The size of a LUKS2 image must be a multiple of its sector size (4096 bytes)"),
    ({"luks-version": 2, "pbkdf-parallel": 0},
     "Requested PBKDF parallel threads cannot be zero."),
])
def test_create_refusals(tmp_path, options, text):
    image = str(tmp_path / "new.img")
    opts = {"driver": "luks", "file": file_ref(image), "size": MiB, "key-secret": "s0",
            "iter-time": 10, **options}
    with pytest.raises(QMPError) as err:
        trio.run(create_image, opts)
    assert err.value.desc == text


def test_luks1_create_unchanged_by_the_extension(tmp_path):
    """luks-version 1 given explicitly is QEMU's format, as when absent."""
    image = str(tmp_path / "new.img")
    trio.run(create_image, {"driver": "luks", "file": file_ref(image), "size": MiB,
                            "key-secret": "s0", "iter-time": 10, "luks-version": 1,
                            "pbkdf": "pbkdf2"})
    assert "Version:       \t1" in cryptsetup("luksDump", image)


def test_amend_of_a_created_luks2_image(tmp_path):
    image = str(tmp_path / "new.img")
    luks2_create(image, MiB, **SMALL_ARGON2)
    key = cryptsetup_volume_key(image, PASSPHRASE.encode())

    async def main() -> None:
        async with opened(luks_node("l", image)) as (graph, [node]):
            for slot in (1, 31):
                await amend.run(graph, "l", {"driver": "luks", "state": "active",
                                             "new-secret": "s1", "keyslot": slot,
                                             "iter-time": 10, **SMALL_ARGON2},
                                False, _NoProgress(), "blockdev-amend")
            with pytest.raises(QMPError) as err:
                await amend.run(graph, "l", {"driver": "luks", "state": "active",
                                             "new-secret": "s1", "keyslot": 32},
                                False, _NoProgress(), "blockdev-amend")
            assert err.value.desc == "Invalid keyslot 32 specified, must be between 0 and 31"
            await amend.run(graph, "l", {"driver": "luks", "state": "inactive",
                                         "old-secret": "s0"},
                            False, _NoProgress(), "blockdev-amend")
            assert [s["keyslot"] for s in node.volume.info()["slots"]] == [1, 31]
    trio.run(main)
    for slot in (1, 31):
        cryptsetup("open", "--test-passphrase", "--key-slot", slot, "--key-file", "-", image,
                   input=b"other")
    assert cryptsetup_volume_key(image, b"other") == key
    assert "Epoch:         \t4" in cryptsetup("luksDump", image)


def test_qcow2_with_luks2_inside(tmp_path):
    """qcow2 encrypt.format luks with luks-version 2: created, opened, written,
    keys amended; 512-byte sectors only."""
    image = str(tmp_path / "q.qcow2")
    trio.run(create_image, {"driver": "qcow2", "file": file_ref(image), "size": 4 * MiB,
                            "encrypt": {"format": "luks", "key-secret": "s0", "iter-time": 10,
                                        "luks-version": 2, **SMALL_ARGON2}})
    # QEMU reads the qcow2 and refuses the LUKS2 inside (README: only qmpd opens it)
    refused = run([require("qemu-img"), "info", image], check=False)
    assert b"LUKS version 2 is not supported" in refused.stderr
    # the crypto header region is a LUKS2 detached header cryptsetup accepts
    raw = open(image, "rb").read()
    meta = qcow2.read_metadata(lambda o, n: raw[o:o + n], len(raw), read_write=False)
    assert meta.crypto_header is not None
    offset, length = meta.crypto_header
    region = tmp_path / "region.hdr"
    region.write_bytes(raw[offset:offset + length])
    dump = cryptsetup("luksDump", region)
    assert "Version:       \t2" in dump and "offset: 0 [bytes]" in dump
    cryptsetup("open", "--test-passphrase", "--key-file", "-", region,
               input=PASSPHRASE.encode())
    data = os.urandom(65536)

    async def main() -> None:
        async with opened(qcow2_node("q", image, encrypted=True)) as (graph, [node]):
            assert node.volume.info()["luks-version"] == 2
            await node.write(MiB, data)
            await amend.run(graph, "q", {"driver": "qcow2", "encrypt": {
                "format": "luks", "state": "active", "new-secret": "s1", "iter-time": 10,
                **SMALL_ARGON2}}, False, _NoProgress(), "blockdev-amend")
            assert [s["keyslot"] for s in node.volume.info()["slots"]] == [0, 1]
        async with opened(qcow2_node("q", image, encrypted=True)) as (_graph, [node]):
            assert await node.read(MiB, 65536) == data
    trio.run(main)
    with pytest.raises(QMPError) as err:
        trio.run(create_image, {"driver": "qcow2", "file": file_ref(str(tmp_path / "b.qcow2")),
                                "size": MiB, "encrypt": {
                                    "format": "luks", "key-secret": "s0", "luks-version": 2,
                                    "sector-size": 4096}})
    assert err.value.desc == "LUKS2 inside qcow2 uses 512-byte sectors only"
