"""The luks node's data path (and LUKS inside qcow2), opened through a BlockGraph.

- Model tests: random reads, writes, zeroes and discards at any alignment
  (the node bounces them through 512-byte read-modify-write); a discard is
  advisory, so its range is "unspecified" in the model.
- Oracles, for every cipher the engine opens and the reference tools make:
  what qmpd writes reads back through qemu-io (``read -P``) and decrypts with
  cryptsetup's volume key under an independent implementation of the
  sector cipher here (``cryptography``'s XTS/CBC/ECB/CTR, IVs as dm-crypt
  and QEMU make them); what qemu-io writes reads back identically through
  qmpd. Images come from qemu-img (QAPI cipher options) and from
  cryptsetup luksFormat (cipher strings). QEMU 7.2 refuses bare ``ecb``
  (cryptsetup's ``aes-ecb``) and aborts on 24-byte keys outside XTS; those
  are checked against cryptsetup's key only.
- qcow2 with LUKS inside, from qemu-img in several ciphers: qemu-io both ways.
"""

from __future__ import annotations

import hashlib
import os
import random
import struct

import pytest
import trio
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given

from tests.block.drivers.datapath_helpers import (
    DISCARD_UNSPECIFIED, KiB, MiB, PASSPHRASE, SECRET_ARG, Templates, create_image, file_ref,
    luks_image_opts,
    luks_node, model_settings, opened, operations, qcow2_image_opts, qcow2_node,
    qemu_img_check, qemu_img_convert_raw, qemu_io, qmpd_luks_image, read_all, run_model)
from tests.oracles import cryptsetup_volume_key, require, run, run_qemu_img

try:
    from cryptography.hazmat.decrepit.ciphers.algorithms import CAST5
except ImportError:  # pragma: no cover - older cryptography
    CAST5 = getattr(algorithms, "CAST5", None)


@pytest.fixture(scope="module")
def templates():
    t = Templates()
    yield t
    t.close()


# -- model tests -----------------------------------------------------------------------

MODEL_CIPHERS = {
    "aes-256-xts-plain64": {},
    "aes-128-cbc-essiv": {"cipher-alg": "aes-128", "cipher-mode": "cbc", "ivgen-alg": "essiv",
                          "ivgen-hash-alg": "sha256"},
    "aes-256-cbc-plain": {"cipher-alg": "aes-256", "cipher-mode": "cbc", "ivgen-alg": "plain"},
}


@pytest.mark.parametrize("cipher", sorted(MODEL_CIPHERS))
def test_model(tmp_path_factory, templates, cipher):
    size = 2 * MiB
    make = qmpd_luks_image(size, **MODEL_CIPHERS[cipher])
    counter = iter(range(10**6))

    @model_settings(10)
    @given(ops=operations(size, hot=192 * KiB, count=16))
    def check(ops):
        path = str(tmp_path_factory.mktemp("l") / f"m{next(counter)}.luks")
        templates.copy(cipher, make, path)
        trio.run(run_model, [luks_node("l0", path)], ops, DISCARD_UNSPECIFIED)

    check()


@pytest.mark.soak
@pytest.mark.parametrize("cipher", sorted(MODEL_CIPHERS))
def test_model_soak(tmp_path_factory, templates, cipher):
    size = 4 * MiB
    make = qmpd_luks_image(size, **MODEL_CIPHERS[cipher])
    counter = iter(range(10**6))

    @model_settings(200)
    @given(ops=operations(size, count=40))
    def check(ops):
        path = str(tmp_path_factory.mktemp("l") / f"m{next(counter)}.luks")
        templates.copy("soak-" + cipher, make, path)
        trio.run(run_model, [luks_node("l0", path)], ops, DISCARD_UNSPECIFIED)

    check()


async def test_unaligned_writes_to_one_sector_lose_nothing(tmp_path, templates):
    """Concurrent read-modify-writes of the same 512-byte sector are serialised."""
    path = templates.copy("aes-256-xts-plain64", qmpd_luks_image(2 * MiB), str(tmp_path / "c.luks"))
    async with opened(luks_node("l0", path)) as (_, [node]):
        async with trio.open_nursery() as nursery:
            for i in range(64):
                nursery.start_soon(node.write, 4096 + i * 8 + 3, bytes([i + 1]) * 5)
        got = await node.read(4096, 512)
    assert all(got[i * 8 + 3:i * 8 + 8] == bytes([i + 1]) * 5 for i in range(64))


async def test_read_only_and_bounds(tmp_path, templates):
    path = templates.copy("aes-256-xts-plain64", qmpd_luks_image(2 * MiB), str(tmp_path / "r.luks"))
    async with opened(luks_node("l0", path, **{"read-only": True})) as (_, [node]):
        assert node.length() == 2 * MiB
        with pytest.raises(OSError):
            await node.write(0, b"x")
        with pytest.raises(OSError):
            await node.read(2 * MiB - 1, 2)
        [extent] = await node.get_block_status(0, 2 * MiB)
        assert extent.data and not extent.zero     # encrypted zeroes are not zeroes


# -- the reference sector cipher (independent of qmpd's) -----------------------------------

def _luks_header(path: str) -> dict:
    with open(path, "rb") as f:
        raw = f.read(592)
    assert raw[:6] == b"LUKS\xba\xbe"
    name = raw[8:40].rstrip(b"\0").decode()
    mode = raw[40:72].rstrip(b"\0").decode()
    payload, key_bytes = struct.unpack(">II", raw[104:112])
    return {"name": name, "mode": mode, "payload": payload * 512, "key_bytes": key_bytes}


def _block_cipher(name: str, key: bytes):
    if name == "aes":
        return algorithms.AES(key)
    if name == "cast5":
        return CAST5(key)
    raise AssertionError(f"no reference for cipher {name}")


def reference_decrypt(name: str, mode: str, key: bytes, first_sector: int, data: bytes) -> bytes:
    """dm-crypt's sector decryption for LUKS1 cipher strings (QEMU's too)."""
    chain, _, ivgen = mode.partition("-")
    out = bytearray()
    for i in range(0, len(data), 512):
        sector, block = first_sector + i // 512, data[i:i + 512]
        if chain == "ecb":
            dec = Cipher(_block_cipher(name, key), modes.ECB()).decryptor()
        else:
            bs = 8 if name == "cast5" else 16
            if chain == "xts":
                bs = 16
            if ivgen == "plain":
                iv = (sector & 0xFFFFFFFF).to_bytes(4, "little").ljust(bs, b"\0")
            elif ivgen == "plain64":
                iv = sector.to_bytes(8, "little").ljust(bs, b"\0")
            elif ivgen.startswith("essiv:"):
                salt = hashlib.new(ivgen.split(":")[1], key).digest()
                enc = Cipher(_block_cipher(name, salt), modes.ECB()).encryptor()
                iv = enc.update(sector.to_bytes(8, "little").ljust(bs, b"\0")) + enc.finalize()
            else:
                raise AssertionError(f"no reference for IV generator {ivgen}")
            mode_obj = {"xts": modes.XTS, "cbc": modes.CBC, "ctr": modes.CTR}[chain](iv)
            dec = Cipher(_block_cipher(name, key), mode_obj).decryptor()
        out += dec.update(block) + dec.finalize()
    return bytes(out)


def test_reference_decrypt_matches_cryptography_xts():
    key = os.urandom(64)
    plain = os.urandom(1024)
    tweak = (7).to_bytes(16, "little")
    enc = Cipher(algorithms.AES(key), modes.XTS(tweak)).encryptor()
    first = enc.update(plain[:512]) + enc.finalize()
    assert reference_decrypt("aes", "xts-plain64", key, 7, first) == plain[:512]


# -- the cipher matrix: qemu-io and cryptsetup as oracles ----------------------------------

#: Each variant: how the image is made, whether QEMU 7.2 opens it, whether
#: cryptsetup can dump its volume key here (it decrypts the key material with
#: the kernel's ciphers: no aes-192-xts, no cast5 on this kernel).
#: cryptsetup luksFormat is fast; qemu-img's PBKDF2 calibration costs seconds
#: per image on a loaded machine, so the qemu-img variants run with --soak
#: (images qmpd's blockdev-create writes cover those QAPI options meanwhile,
#: and the rest of the suite opens qemu-img's LUKS images everywhere).
VARIANTS = {
    # cryptsetup luksFormat --cipher/--key-size
    "cs-aes-xts-plain64-512": (("cryptsetup", "aes-xts-plain64", 512), True, True),
    "cs-aes-xts-plain64-256": (("cryptsetup", "aes-xts-plain64", 256), True, True),
    "cs-aes-xts-plain-256": (("cryptsetup", "aes-xts-plain", 256), True, True),
    "cs-aes-cbc-essiv-256": (("cryptsetup", "aes-cbc-essiv:sha256", 256), True, True),
    "cs-aes-cbc-essiv-128": (("cryptsetup", "aes-cbc-essiv:sha256", 128), True, True),
    "cs-aes-cbc-plain-128": (("cryptsetup", "aes-cbc-plain", 128), True, True),
    "cs-aes-cbc-plain64-256": (("cryptsetup", "aes-cbc-plain64", 256), True, True),
    "cs-aes-ctr-plain64-256": (("cryptsetup", "aes-ctr-plain64", 256), True, True),
    # QEMU: "Unexpected cipher mode string format 'ecb'"
    "cs-aes-ecb-256": (("cryptsetup", "aes-ecb", 256), False, True),
    # QEMU 7.2 aborts on 24-byte keys outside XTS (key material not a multiple of 512)
    "cs-aes-cbc-essiv-192": (("cryptsetup", "aes-cbc-essiv:sha256", 192), False, True),
    # qmpd's blockdev-create (QAPI names), QEMU as the oracle
    "qmpd-aes-192-xts-plain64": (("qmpd", {"cipher-alg": "aes-192"}), True, False),
    # the kernel has no "ecb-plain64": no volume key from cryptsetup
    "qmpd-aes-256-ecb-plain64": (("qmpd", {"cipher-mode": "ecb", "ivgen-alg": "plain64"}),
                                 True, False),
    "qmpd-aes-128-ctr-plain64": (("qmpd", {"cipher-alg": "aes-128", "cipher-mode": "ctr",
                                           "ivgen-alg": "plain64"}), True, True),
    "qmpd-aes-256-cbc-essiv-hash-sha512": (
        ("qmpd", {"cipher-mode": "cbc", "ivgen-alg": "essiv", "ivgen-hash-alg": "sha256",
                  "hash-alg": "sha512"}), True, True),
    "qmpd-cast5-128-cbc-plain64": (("qmpd", {"cipher-alg": "cast5-128", "cipher-mode": "cbc",
                                             "ivgen-alg": "plain64"}), True, False),
}
SOAK_VARIANTS = {
    "qemu-aes-256-xts-plain64": (("qemu-img", ""), True, True),
    "qemu-aes-128-cbc-essiv-sha256": (("qemu-img", "cipher-alg=aes-128,cipher-mode=cbc,"
                                       "ivgen-alg=essiv,ivgen-hash-alg=sha256"), True, True),
    "qemu-aes-128-xts-plain64": (("qemu-img", "cipher-alg=aes-128"), True, True),
    "qemu-aes-192-xts-plain64": (("qemu-img", "cipher-alg=aes-192"), True, False),
    "qemu-aes-128-xts-plain": (("qemu-img", "cipher-alg=aes-128,ivgen-alg=plain"), True, True),
    "qemu-aes-256-cbc-plain": (("qemu-img", "cipher-mode=cbc,ivgen-alg=plain"), True, True),
    "qemu-aes-256-cbc-plain64": (("qemu-img", "cipher-mode=cbc,ivgen-alg=plain64,"
                                  "hash-alg=sha512"), True, True),
    "qemu-aes-256-cbc-essiv-sha256": (("qemu-img", "cipher-mode=cbc,ivgen-alg=essiv,"
                                       "ivgen-hash-alg=sha256"), True, True),
    "qemu-aes-256-ecb-plain64": (("qemu-img", "cipher-mode=ecb,ivgen-alg=plain64"), True, False),
    "qemu-aes-128-ctr-plain64": (("qemu-img", "cipher-alg=aes-128,cipher-mode=ctr,"
                                  "ivgen-alg=plain64"), True, True),
    "qemu-cast5-128-cbc-plain64": (("qemu-img", "cipher-alg=cast5-128,cipher-mode=cbc,"
                                    "ivgen-alg=plain64"), True, False),
}

IMAGE_SIZE = 6 * MiB
#: (offset, length, byte): unaligned heads and tails, a sector boundary, the end.
QMPD_WRITES = [(0, 512, 0x11), (1000, 3000, 0x22), (MiB - 3, 6, 0x33), (65536, 65536, 0x44)]
QEMU_WRITES = [(2 * MiB, 4096, 0x55), (2 * MiB + 8192 + 17, 700, 0x66), (3 * MiB, 512, 0x77)]
ZERO_AT = 3 * MiB + MiB // 2 + 100


def _make(path: str, how: tuple) -> None:
    if how[0] == "cryptsetup":
        require("cryptsetup")
        with open(path, "wb") as f:
            f.truncate(IMAGE_SIZE)
        run(["cryptsetup", "luksFormat", "--type", "luks1", "--batch-mode", "--cipher", how[1],
             "--key-size", str(how[2]), "--hash", "sha256", "--pbkdf-force-iterations", "1000",
             "--key-file", "-", path], input=PASSPHRASE.encode())
    elif how[0] == "qemu-img":
        opts = "key-secret=s0,iter-time=10" + ("," + how[1] if how[1] else "")
        run_qemu_img(["create", "-q", "-f", "luks", "--object", SECRET_ARG, "-o", opts, path,
                      str(IMAGE_SIZE)])
    else:
        qmpd_luks_image(IMAGE_SIZE, **how[1])(path)


def _pattern_bytes(writes) -> list[tuple[int, bytes]]:
    return [(off, bytes([byte]) * n) for off, n, byte in writes]


async def _qmpd_reads_and_writes(path: str, expect: list[tuple[int, bytes]]) -> int:
    async with opened(luks_node("l0", path)) as (_, [node]):
        for off, data in expect:
            assert await node.read(off, len(data)) == data, f"qemu-io's bytes at {off}"
        for off, data in _pattern_bytes(QMPD_WRITES):
            await node.write(off, data)
        await node.write_zeroes(ZERO_AT, 5000)
        await node.flush_all()
        return node.length()


def _check_with_volume_key(path: str, regions: list[tuple[int, bytes]]) -> None:
    header = _luks_header(path)
    key = cryptsetup_volume_key(path, PASSPHRASE.encode())
    assert len(key) == header["key_bytes"]
    with open(path, "rb") as f:
        for off, data in regions:
            first = off // 512
            end = -(-(off + len(data)) // 512) * 512
            f.seek(header["payload"] + first * 512)
            plain = reference_decrypt(header["name"], header["mode"], key, first,
                                      f.read(end - first * 512))
            assert plain[off - first * 512:off - first * 512 + len(data)] == data, \
                f"{header['name']}-{header['mode']}: bytes at {off}"


def _matrix_check(tmp_path, variant: tuple) -> None:
    how, qemu_opens, key_oracle = variant
    if how[0] == "qmpd" and "cast5" in how[1].get("cipher-alg", "") and CAST5 is None:
        pytest.skip("this cryptography has no CAST5")
    path = str(tmp_path / "m.luks")
    _make(path, how)
    if not qemu_opens:   # the reason is QEMU's, and it still holds
        require("qemu-io")
        proc = run(["qemu-io", "--object", SECRET_ARG, "--image-opts", luks_image_opts(path),
                    "-c", "read 0 512"], check=False)
        assert proc.returncode != 0 or b"read 512/512" not in proc.stdout
    expect = []
    if qemu_opens:
        qemu_io(luks_image_opts(path),
                *[f"write -P {byte:#x} {off} {n}" for off, n, byte in QEMU_WRITES])
        expect = _pattern_bytes(QEMU_WRITES)
    length = trio.run(_qmpd_reads_and_writes, path, expect)
    assert length == os.path.getsize(path) - _luks_header(path)["payload"]
    written = _pattern_bytes(QMPD_WRITES) + [(ZERO_AT, bytes(5000))]
    if qemu_opens:
        qemu_io(luks_image_opts(path),
                *[f"read -P {data[0]:#x} {off} {len(data)}" for off, data in written])
    if key_oracle:
        _check_with_volume_key(path, written + expect)


@pytest.mark.interop
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_cipher_matrix(tmp_path, name):
    _matrix_check(tmp_path, VARIANTS[name])


@pytest.mark.interop
@pytest.mark.soak
@pytest.mark.parametrize("name", sorted(SOAK_VARIANTS))
def test_cipher_matrix_qemu_img_soak(tmp_path, name):
    _matrix_check(tmp_path, SOAK_VARIANTS[name])


# -- qcow2 with LUKS inside --------------------------------------------------------------

QCOW2_LUKS = {
    "aes-256-xts-plain64": {},
    "aes-128-cbc-essiv": {"cipher-alg": "aes-128", "cipher-mode": "cbc", "ivgen-alg": "essiv",
                          "ivgen-hash-alg": "sha256"},
    "aes-256-cbc-plain64": {"cipher-alg": "aes-256", "cipher-mode": "cbc",
                            "ivgen-alg": "plain64"},
    "aes-128-xts-plain": {"cipher-alg": "aes-128", "cipher-mode": "xts", "ivgen-alg": "plain"},
}
#: (maker, cipher, cluster size): qemu-img's images cost seconds each (PBKDF2
#: calibration), so qmpd's blockdev-create makes the default run's (qemu-io
#: and qemu-img check are the oracles either way); --soak runs qemu-img's
#: for every cipher (tests/block/drivers/test_qcow2_clusters_interop.py has
#: qemu-img's LUKS qcow2 images in the default run).
QCOW2_DEFAULT = [("qmpd", "aes-256-xts-plain64", 65536),
                 ("qmpd", "aes-128-cbc-essiv", 4096),
                 ("qmpd", "aes-256-cbc-plain64", 512),
                 ("qmpd", "aes-128-xts-plain", 2 * MiB)]
QCOW2_SOAK = [("qemu-img", "aes-128-cbc-essiv", 4096), ("qemu-img", "aes-256-cbc-plain64", 512),
              ("qemu-img", "aes-128-xts-plain", 2 * MiB), ("qemu-img", "aes-256-xts-plain64", 65536)]


def _make_qcow2_luks(path: str, maker: str, cipher: str, cluster_size: int, size: int) -> None:
    crypt = QCOW2_LUKS[cipher]
    if maker == "qemu-img":
        opts = [f"cluster_size={cluster_size}", "encrypt.format=luks", "encrypt.key-secret=s0",
                "encrypt.iter-time=10"] + [f"encrypt.{k}={v}" for k, v in crypt.items()]
        run_qemu_img(["create", "-q", "-f", "qcow2", "--object", SECRET_ARG, "-o",
                      ",".join(opts), path, str(size)])
    else:
        trio.run(create_image, {"driver": "qcow2", "file": file_ref(path), "size": size,
                                "cluster-size": cluster_size,
                                "encrypt": {"format": "luks", "key-secret": "s0",
                                            "iter-time": 10, **crypt}})


async def _qcow2_luks_both_ways(tmp_path, maker: str, cipher: str, cluster_size: int) -> None:
    path = str(tmp_path / "e.qcow2")
    size = 8 * MiB
    await trio.to_thread.run_sync(_make_qcow2_luks, path, maker, cipher, cluster_size, size)
    image = qcow2_image_opts(path, True)
    await trio.to_thread.run_sync(lambda: qemu_io(
        image, *[f"write -P {byte:#x} {off} {n}" for off, n, byte in QEMU_WRITES],
        "write -z 5M 64k"))
    rng = random.Random(f"{cipher}{cluster_size}")
    ours = [(rng.randrange(0, size - 70000), rng.randrange(1, 70000)) for _ in range(6)]
    async with opened(qcow2_node("q0", path, encrypted=True)) as (_, [node]):
        assert node.length() == size
        for off, data in _pattern_bytes(QEMU_WRITES):
            assert await node.read(off, len(data)) == data
        assert await node.read(5 * MiB, 65536) == bytes(65536)
        expected = bytearray(await read_all(node))
        for i, (off, n) in enumerate(ours):
            data = bytes([0xA0 + i]) * n
            await node.write(off, data)
            expected[off:off + n] = data
        discard = min(2 * cluster_size + 1, size - 6 * MiB)
        await node.discard(6 * MiB, discard)
        first = -(-6 * MiB // cluster_size) * cluster_size
        last = (6 * MiB + discard) // cluster_size * cluster_size
        expected[first:last] = bytes(last - first)
        await node.write_zeroes(7 * MiB + 3, 4096, may_unmap=True)
        expected[7 * MiB + 3:7 * MiB + 4099] = bytes(4096)
    await trio.to_thread.run_sync(qemu_img_check, image)
    raw = await trio.to_thread.run_sync(qemu_img_convert_raw, image, str(tmp_path / "out.raw"))
    assert raw == bytes(expected)
    off = ours[0][0]
    await trio.to_thread.run_sync(lambda: qemu_io(
        image, f"read -P {expected[off]:#x} {off} 1", f"read -P 0 {7 * MiB + 3} 4096"))


@pytest.mark.interop
@pytest.mark.parametrize("maker,cipher,cluster_size", QCOW2_DEFAULT)
async def test_qcow2_luks_both_ways(tmp_path, maker, cipher, cluster_size):
    await _qcow2_luks_both_ways(tmp_path, maker, cipher, cluster_size)


@pytest.mark.interop
@pytest.mark.soak
@pytest.mark.parametrize("maker,cipher,cluster_size", QCOW2_SOAK)
async def test_qcow2_luks_both_ways_soak(tmp_path, maker, cipher, cluster_size):
    await _qcow2_luks_both_ways(tmp_path, maker, cipher, cluster_size)
