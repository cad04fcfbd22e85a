"""The luks driver on LUKS2 images made by cryptsetup: open, data path, info, refusals.

cryptsetup is the oracle both ways, without device-mapper:

* *cryptsetup encrypts, qmpd reads.* ``reencrypt --encrypt
  --force-offline-reencrypt --reduce-device-size 16M`` encrypts a file of
  known plaintext in place, in userspace, with the header in the same file
  (the data moves to the segment offset, half the reduction: 8 MiB).
* *qmpd writes, cryptsetup decrypts.* cryptsetup decrypts only with a
  detached header whose segment starts at 0, so the test copies the
  payload out, makes such a header for the same volume key (``luksFormat
  --header --volume-key-file``, the key from ``luksDump
  --dump-volume-key``) and runs ``reencrypt --decrypt`` on the copy.

Both for segment sector sizes 512 and 4096 (IVs in 512-byte units).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import time
from pathlib import Path

import pytest
import trio

from qmpd.block import amend, query
from qmpd.errors import QMPError
from tests.block.drivers.datapath_helpers import PASSPHRASE, MiB, luks_node, opened
from tests.oracles import cryptsetup_volume_key, require, run

PBKDF2 = ("--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000")
ARGON2ID = ("--pbkdf", "argon2id", "--pbkdf-memory", "32", "--pbkdf-force-iterations", "4",
            "--pbkdf-parallel", "1")
CIPHER = ("--cipher", "aes-xts-plain64", "--key-size", "512")
SECTOR_SIZES = (512, 4096)

IMAGE_SIZE = 32 * MiB
REDUCE = 16 * MiB
OFFSET = REDUCE // 2                  # where cryptsetup puts the moved data
KEPT = IMAGE_SIZE - REDUCE            # plaintext bytes that survive the move
PAYLOAD = IMAGE_SIZE - OFFSET         # the dynamic segment's length


def cryptsetup(*args: object, input: bytes | None = None) -> str:
    require("cryptsetup")
    return run(["cryptsetup", *map(str, args)], input=input).stdout.decode()


def key_file(tmp_path: Path, passphrase: str = PASSPHRASE) -> Path:
    path = tmp_path / f"key-{passphrase}"
    path.write_bytes(passphrase.encode())
    return path


def formatted(tmp_path: Path, *options: str, sector_size: int = 512,
              passphrase: str = PASSPHRASE, size: int = 32 * MiB) -> Path:
    """A fresh cryptsetup luksFormat --type luks2 image (payload unwritten).

    32 MiB: cryptsetup's default LUKS2 data offset is 16 MiB, so a 16 MiB
    file has no payload at all (cryptsetup: "too small for activation").
    """
    image = tmp_path / "fmt.img"
    with open(image, "wb") as f:
        f.truncate(size)
    cryptsetup("luksFormat", "--type", "luks2", "--batch-mode", "--key-file",
               key_file(tmp_path, passphrase), *(options or PBKDF2), *CIPHER,
               "--sector-size", sector_size, image)
    return image


def encrypted(tmp_path: Path, sector_size: int) -> tuple[Path, bytes]:
    """(image, plaintext): known data encrypted in place by cryptsetup."""
    plaintext = os.urandom(KEPT)
    image = tmp_path / "enc.img"
    image.write_bytes(plaintext + bytes(IMAGE_SIZE - KEPT))
    cryptsetup("reencrypt", "--encrypt", "--type", "luks2", "--batch-mode",
               "--force-offline-reencrypt", "--reduce-device-size", REDUCE,
               "--key-file", key_file(tmp_path), *PBKDF2, *CIPHER,
               "--sector-size", sector_size, image)
    return image, plaintext


def cryptsetup_decrypt(tmp_path: Path, image: Path, sector_size: int) -> bytes:
    """The payload of ``image`` as cryptsetup decrypts it (see the module docstring)."""
    vk = tmp_path / "vk"
    vk.write_bytes(cryptsetup_volume_key(str(image), PASSPHRASE.encode()))
    data = tmp_path / "payload.bin"
    data.write_bytes(image.read_bytes()[OFFSET:])
    header = tmp_path / "detached.hdr"
    with open(header, "wb") as f:
        f.truncate(4 * MiB)
    keys = key_file(tmp_path)
    cryptsetup("luksFormat", "--type", "luks2", "--batch-mode", "--header", header,
               "--volume-key-file", vk, *CIPHER, "--sector-size", sector_size,
               "--key-file", keys, *PBKDF2, data)
    cryptsetup("reencrypt", "--decrypt", "--batch-mode", "--force-offline-reencrypt",
               "--key-file", keys, "--header", header, data)
    return data.read_bytes()


def rewrite_metadata(image: Path, change) -> None:
    """Edit the JSON of both header copies (cryptsetup has no option for some
    fields) and recompute their checksums."""
    with open(image, "r+b") as f:
        hdr_size = struct.unpack(">Q", f.read(16)[8:16])[0]
        for offset in (0, hdr_size):
            f.seek(offset)
            copy = bytearray(f.read(hdr_size))
            area = bytes(copy[4096:])
            metadata = json.loads(area[:area.index(b"\0")])
            change(metadata)
            text = json.dumps(metadata).encode()
            assert len(text) < hdr_size - 4096
            copy[4096:] = text.ljust(hdr_size - 4096, b"\0")
            copy[448:448 + 64] = bytes(64)
            copy[448:448 + 32] = hashlib.sha256(copy).digest()
            f.seek(offset)
            f.write(copy)


def read_all(node, length: int) -> bytes:
    async def go() -> bytes:
        return await node.read(0, length)
    return trio.run(go)


# -- cryptsetup encrypts, qmpd reads -------------------------------------------------------

@pytest.mark.parametrize("sector_size", SECTOR_SIZES)
def test_reads_what_cryptsetup_encrypted(tmp_path, sector_size):
    image, plaintext = encrypted(tmp_path, sector_size)

    async def main() -> None:
        async with opened(luks_node("l", str(image), **{"read-only": True})) as (_graph, [node]):
            assert node.length() == PAYLOAD
            assert node.request_alignment == sector_size
            assert await node.read(0, KEPT) == plaintext
            # unaligned: bounced through whole sectors
            assert await node.read(100, 5000) == plaintext[100:5100]
            assert await node.read(KEPT - 1000, 999) == plaintext[KEPT - 1000:KEPT - 1]
    trio.run(main)


@pytest.mark.parametrize("sector_size", SECTOR_SIZES)
def test_cryptsetup_decrypts_what_qmpd_wrote(tmp_path, sector_size):
    image, plaintext = encrypted(tmp_path, sector_size)
    expected = bytearray(plaintext + bytes(PAYLOAD - KEPT))   # the tail: see reread
    writes = [(0, os.urandom(4096)), (12345, os.urandom(777)),        # unaligned
              (3 * MiB + 512, os.urandom(1536)), (PAYLOAD - 8192, os.urandom(8192))]

    async def write() -> None:
        async with opened(luks_node("l", str(image))) as (_graph, [node]):
            for offset, data in writes:
                await node.write(offset, data)
                expected[offset:offset + len(data)] = data
            await node.flush_all()

    async def reread() -> None:
        async with opened(luks_node("l", str(image))) as (_graph, [node]):
            # [KEPT, PAYLOAD - 8192) was never encrypted by anyone: undefined
            assert await node.read(0, KEPT) == expected[:KEPT]
            assert await node.read(PAYLOAD - 8192, 8192) == writes[-1][1]
    trio.run(write)
    trio.run(reread)
    # the tail past KEPT was never written by cryptsetup: compare what was
    decrypted = cryptsetup_decrypt(tmp_path, image, sector_size)
    assert len(decrypted) == PAYLOAD
    assert decrypted[:KEPT] == expected[:KEPT]
    assert decrypted[PAYLOAD - 8192:] == writes[-1][1]


# -- images from luksFormat ----------------------------------------------------------------

@pytest.mark.parametrize("kdf, sector_size", [(PBKDF2, 512), (PBKDF2, 4096), (ARGON2ID, 4096)],
                         ids=["pbkdf2-512", "pbkdf2-4096", "argon2id-4096"])
def test_luksformat_image_opens_writes_and_queries(tmp_path, kdf, sector_size):
    image = formatted(tmp_path, *kdf, sector_size=sector_size)
    dump = cryptsetup("luksDump", image)
    uuid = next(line.split()[1] for line in dump.splitlines() if line.startswith("UUID:"))
    data = os.urandom(3 * sector_size)

    async def main() -> None:
        async with opened(luks_node("l", str(image))) as (graph, [node]):
            info = node.volume.info()
            offset = info["payload-offset"]
            assert node.length() == 32 * MiB - offset
            assert node.request_alignment == sector_size
            await node.write(sector_size, data)
            before = await node.read(0, sector_size)          # unwritten: noise
            await node.write(7, b"abc")                       # read-modify-write
            assert await node.read(0, sector_size) == before[:7] + b"abc" + before[10:]
            [entry] = [e for e in query.named_block_nodes(graph) if e["node-name"] == "l"]
            spec = entry["image"]["format-specific"]
            assert spec["type"] == "luks"
            assert spec["data"] == info
            assert entry["image"]["virtual-size"] == 32 * MiB - offset
            assert entry["encrypted"] is True
        assert info["cipher-alg"] == "aes-256" and info["cipher-mode"] == "xts"
        assert info["ivgen-alg"] == "plain64" and "ivgen-hash-alg" not in info
        assert info["hash-alg"] == "sha256" and info["uuid"] == uuid
        assert list(info) == ["cipher-alg", "cipher-mode", "ivgen-alg", "hash-alg",
                              "payload-offset", "master-key-iters", "uuid", "slots",
                              "luks-version", "label", "sector-size"]
        assert (info["luks-version"], info["label"], info["sector-size"]) == (2, "", sector_size)
        [slot] = info["slots"]
        assert slot["active"] is True and slot["stripes"] == 4000
        assert slot["key-offset"] == 32768 and slot["keyslot"] == 0
        assert ("iters" in slot) == (kdf is PBKDF2)
        if kdf is PBKDF2:
            assert slot["pbkdf"] == "pbkdf2" and "pbkdf-memory" not in slot
        else:
            assert (slot["pbkdf"], slot["pbkdf-time"], slot["pbkdf-memory"],
                    slot["pbkdf-parallel"]) == ("argon2id", 4, 32, 1)

        async with opened(luks_node("l", str(image), **{"read-only": True})) as (_g, [node]):
            assert await node.read(sector_size, len(data)) == data
            assert await node.read(0, sector_size) == before[:7] + b"abc" + before[10:]
    trio.run(main)


def test_second_keyslot_opens_and_is_listed(tmp_path):
    image = formatted(tmp_path, passphrase="other")          # keyslot 0
    cryptsetup("luksAddKey", "--batch-mode", "--key-file", key_file(tmp_path, "other"),
               *PBKDF2, image, key_file(tmp_path))           # keyslot 1: "pw"

    async def main() -> None:
        async with opened(luks_node("l", str(image))) as (_graph, [node]):
            assert node.volume.keyslot == 1
            slots = node.volume.info()["slots"]     # existing keyslots, id order
            assert [s["active"] for s in slots] == [True, True]
            assert slots[0]["key-offset"] < slots[1]["key-offset"]
    trio.run(main)


def test_wrong_passphrase(tmp_path):
    image = formatted(tmp_path, passphrase="not-pw")

    async def main() -> None:
        with pytest.raises(QMPError) as err:
            async with opened(luks_node("l", str(image))):
                pass
        assert err.value.desc == "Invalid password, cannot unlock any keyslot"
    trio.run(main)


def test_amend_adds_and_erases_keys_cryptsetup_sees(tmp_path):
    """blockdev-amend on a LUKS2 node: the LUKS2 engine behind the same job
    body as LUKS1 (slot 31 is a valid id here, 8 is not an error)."""
    image = formatted(tmp_path)
    key = cryptsetup_volume_key(image, PASSPHRASE.encode())

    async def main() -> None:
        async with opened(luks_node("l", str(image))) as (graph, [node]):
            add = {"driver": "luks", "state": "active", "new-secret": "s1", "keyslot": 31,
                   "iter-time": 10, "pbkdf": "argon2id", "pbkdf-memory": 64,
                   "pbkdf-parallel": 1}
            await amend.check_permissions(graph, "l", add, "blockdev-amend")
            await amend.run(graph, "l", add, False, _NoProgress(), "blockdev-amend")
            assert node.busy is None and not node.updating_keys
            slots = node.volume.info()["slots"]
            assert [s.get("keyslot") for s in slots] == [0, 31]
            with pytest.raises(QMPError) as err:
                await amend.run(graph, "l", {**add, "keyslot": 3, "pbkdf-parallel": 0}, False,
                                _NoProgress(), "blockdev-amend")
            assert err.value.desc == "Requested PBKDF parallel threads cannot be zero."
    trio.run(main)
    cryptsetup("open", "--test-passphrase", "--key-slot", 31, "--key-file",
               key_file(tmp_path, "other"), image)
    dump = cryptsetup("luksDump", image)
    assert "31: luks2" in dump and "argon2id" in dump
    assert cryptsetup_volume_key(image, b"other") == key

    async def erase() -> None:
        async with opened(luks_node("l", str(image))) as (graph, [node]):
            await amend.run(graph, "l", {"driver": "luks", "state": "inactive", "keyslot": 0},
                            False, _NoProgress(), "blockdev-amend")
            assert [s.get("keyslot") for s in node.volume.info()["slots"]] == [31]
    trio.run(erase)
    assert "0: luks2" not in cryptsetup("luksDump", image)
    assert cryptsetup_volume_key(image, b"other") == key


class _NoProgress:
    def set(self, current: int, total: int) -> None:
        pass


def test_mandatory_requirements_are_refused(tmp_path):
    image = formatted(tmp_path)

    def require_feature(metadata: dict) -> None:
        metadata["config"]["requirements"] = {"mandatory": ["some-future-feature"]}
    rewrite_metadata(image, require_feature)

    async def main() -> None:
        for read_only in (False, True):
            with pytest.raises(QMPError) as err:
                async with opened(luks_node("l", str(image), **{"read-only": read_only})):
                    pass
            assert err.value.desc == ("Unmet LUKS2 requirements detected "
                                      "(some-future-feature); qmpd cannot open this image")
    trio.run(main)


def test_fixed_segment_size(tmp_path):
    image = formatted(tmp_path, sector_size=4096)

    def fix(metadata: dict) -> None:
        metadata["segments"]["0"]["size"] = str(4 * MiB)
    rewrite_metadata(image, fix)

    async def main() -> None:
        async with opened(luks_node("l", str(image))) as (_graph, [node]):
            assert node.length() == 4 * MiB
            with pytest.raises(QMPError, match="fixed segment size"):
                await trio.to_thread.run_sync(node.resize, 8 * MiB)
    trio.run(main)

    def too_long(metadata: dict) -> None:
        metadata["segments"]["0"]["size"] = str(64 * MiB)
    rewrite_metadata(image, too_long)

    async def refused() -> None:
        with pytest.raises(QMPError) as err:
            async with opened(luks_node("l", str(image))):
                pass
        assert err.value.desc.startswith("Device is too small.")
    trio.run(refused)


def test_dynamic_segment_resize(tmp_path):
    image = formatted(tmp_path, sector_size=4096)

    async def main() -> None:
        async with opened(luks_node("l", str(image))) as (_graph, [node]):
            offset = node.volume.payload_offset
            with pytest.raises(QMPError, match="multiple of its sector size"):
                await trio.to_thread.run_sync(node.resize, 8 * MiB + 512)
            await trio.to_thread.run_sync(node.resize, 8 * MiB)
            assert node.length() == 8 * MiB
        assert image.stat().st_size == offset + 8 * MiB
    trio.run(main)


def test_secrets_stay_out_of_reprs(tmp_path):
    image = formatted(tmp_path)

    async def main() -> None:
        async with opened(luks_node("l", str(image))) as (_graph, [node]):
            volume = node.volume
            key = bytes(volume.volume_key)
            assert key.hex() not in repr(volume) and key.hex() not in repr(volume.header)
            assert key.hex() not in json.dumps(volume.info())
        assert not volume._volume_key and "closed" in repr(volume)   # wiped on close
    trio.run(main)


# -- the whole daemon: blockdev-add over QMP, query-named-block-nodes, amend, NBD ------------

@pytest.mark.interop
@pytest.mark.parametrize("sector_size", SECTOR_SIZES)
def test_daemon_exports_a_cryptsetup_image_over_nbd(tmp_path, sector_size):
    import tempfile

    from qmpd.testing import QmpdProcess
    from tests.qmp_client import QmpClient

    qemu_img, qemu_io = require("qemu-img"), require("qemu-io")
    image, plaintext = encrypted(tmp_path, sector_size)
    workdir = tempfile.mkdtemp(prefix="l2-")      # unix socket paths are short
    sock = os.path.join(workdir, "nbd.sock")
    uri = f"nbd+unix:///disk?socket={sock}"
    daemon = QmpdProcess(["--object", f"secret,id=s0,data={PASSPHRASE}",
                          "--object", "secret,id=s1,data=other",
                          "--nbd-server", f"addr.type=unix,addr.path={sock}"],
                         workdir=workdir).start()
    try:
        with QmpClient(daemon.socket_path, negotiate=True) as qmp:
            qmp.ok("blockdev-add", {"driver": "luks", "node-name": "l0", "key-secret": "s0",
                                    "file": {"driver": "file", "filename": str(image)}})
            [entry] = [e for e in qmp.ok("query-named-block-nodes") if e["node-name"] == "l0"]
            data = entry["image"]["format-specific"]["data"]
            assert data["payload-offset"] == OFFSET
            assert entry["image"]["virtual-size"] == PAYLOAD
            qmp.ok("block-export-add", {"type": "nbd", "id": "e0", "node-name": "l0",
                                        "name": "disk", "writable": True})
            # a key added while the export serves (argon2id, small costs)
            job = qmp.run_job("blockdev-amend", {
                "job-id": "j0", "node-name": "l0",
                "options": {"driver": "luks", "state": "active", "new-secret": "s1",
                            "keyslot": 5, "iter-time": 10, "pbkdf-memory": 64}}, "j0")
            assert "error" not in job, job
            out = tmp_path / "out.raw"
            run([qemu_img, "convert", "-f", "raw", "-O", "raw", uri, str(out)])
            assert out.read_bytes()[:KEPT] == plaintext
            run([qemu_io, "-f", "raw", "-c", "write -P 0x5a 1000 9000", uri])
            # qemu-io has exited, but the server may not have seen it hang up yet
            deadline = time.monotonic() + 10
            while "error" in (reply := qmp.cmd("block-export-del", {"id": "e0"})):
                assert "still in use" in reply["error"]["desc"], reply
                assert time.monotonic() < deadline, reply
                time.sleep(0.05)
            qmp.wait_event("BLOCK_EXPORT_DELETED", id="e0")
            qmp.ok("blockdev-del", {"node-name": "l0"})
    finally:
        daemon.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    async def reread() -> None:
        async with opened(luks_node("l", str(image))) as (_graph, [node]):
            assert await node.read(0, 20000) == (plaintext[:1000] + b"\x5a" * 9000
                                                 + plaintext[10000:20000])
    trio.run(reread)
    cryptsetup("open", "--test-passphrase", "--key-slot", 5, "--key-file",
               key_file(tmp_path, "other"), image)
