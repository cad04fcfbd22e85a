"""Creating and opening volumes in memory: options, layout, info, secrets."""

from __future__ import annotations

import hashlib

import pytest

from qmpd.crypto.errors import CryptoError
from qmpd.crypto.luks import (
    LuksCreateOptions, MemoryImageIO, create_volume, header_length, open_volume, read_header)
from tests.crypto.luks.images import FAST


def _counter_random():
    state = {"n": 0}

    def random_bytes(n: int) -> bytes:
        out = b""
        while len(out) < n:
            state["n"] += 1
            out += hashlib.sha256(state["n"].to_bytes(8, "big")).digest()
        return out[:n]
    return random_bytes


COMBOS = [
    dict(),
    dict(cipher_alg="aes-128", cipher_mode="xts"),
    dict(cipher_alg="aes-192", cipher_mode="xts"),
    dict(cipher_alg="aes-256", cipher_mode="cbc", ivgen_alg="essiv"),
    dict(cipher_alg="aes-256", cipher_mode="cbc", ivgen_alg="essiv", ivgen_hash_alg="md5"),
    dict(cipher_alg="aes-192", cipher_mode="cbc", ivgen_alg="plain", hash_alg="sha512"),
    dict(cipher_alg="aes-128", cipher_mode="ctr", ivgen_alg="plain64", hash_alg="md5"),
    dict(cipher_alg="aes-256", cipher_mode="ecb", hash_alg="sha224"),
    dict(cipher_alg="aes-256", cipher_mode="xts", hash_alg="sha384"),
    dict(cipher_alg="cast5-128", cipher_mode="cbc", ivgen_alg="plain64"),
]


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(map(str, c.values())) or "defaults")
def test_create_then_open(combo):
    options = LuksCreateOptions(iter_time=FAST, **combo)
    io = MemoryImageIO()
    created = create_volume(io, b"pass phrase", options)
    assert io.size() == header_length(options) == created.payload_offset
    opened = open_volume(io, b"pass phrase")
    assert opened.volume_key == created.volume_key
    assert opened.info() == created.info()
    sector = bytes(range(256)) * 2
    assert opened.cipher.decrypt(7, created.cipher.encrypt(7, sector)) == sector
    if options.cipher_mode != "ecb":   # ECB has no IV: sectors are alike
        assert created.cipher.encrypt(7, sector) != created.cipher.encrypt(8, sector)
    with pytest.raises(CryptoError) as err:
        open_volume(io, b"pass phrasE")
    assert str(err.value) == "Invalid password, cannot unlock any keyslot"


def test_defaults_and_layout_are_qemu_imgs():
    io = MemoryImageIO()
    volume = create_volume(io, b"pw", LuksCreateOptions(iter_time=FAST))
    header = volume.header
    assert (header.cipher_name_str, header.cipher_mode_str, header.hash_spec_str) == (
        "aes", "xts-plain64", "sha256")
    assert header.key_bytes == 64 and header.payload_offset == 4040
    assert [s.key_offset for s in header.slots] == [8 + 504 * i for i in range(8)]
    assert [s.is_active for s in header.slots] == [True] + [False] * 7
    assert all(s.iterations == 0 and s.salt == bytes(32) for s in header.slots[1:])
    assert header.slots[0].iterations >= 1000 and header.mk_digest_iterations >= 1000
    assert len(header.uuid_str) == 36 and header.uuid[36:] == bytes(4)


def test_info_is_qemus_QCryptoBlockInfoLUKS():
    io = MemoryImageIO()
    volume = create_volume(io, b"pw", LuksCreateOptions(
        cipher_alg="aes-128", cipher_mode="cbc", ivgen_alg="essiv", iter_time=FAST))
    info = volume.info()
    assert list(info) == ["cipher-alg", "cipher-mode", "ivgen-alg", "ivgen-hash-alg",
                          "hash-alg", "payload-offset", "master-key-iters", "uuid", "slots"]
    assert info["ivgen-hash-alg"] == "sha256"
    assert info["slots"][0] == {"active": True, "iters": volume.header.slots[0].iterations,
                                "stripes": 4000, "key-offset": 4096}
    assert info["slots"][1] == {"active": False, "key-offset": 4096 + 128 * 512}
    assert info["payload-offset"] == volume.payload_offset == 4096 + 8 * 128 * 512
    plain = create_volume(MemoryImageIO(), b"pw", LuksCreateOptions(
        ivgen_hash_alg="sha256", iter_time=FAST))
    assert "ivgen-hash-alg" not in plain.info()
    # QEMU writes the hash even for plain64, where it means nothing.
    assert plain.header.cipher_mode_str == "xts-plain64:sha256"


def test_same_randomness_same_image():
    images = []
    for _ in range(2):
        io = MemoryImageIO()
        create_volume(io, b"pw", LuksCreateOptions(iter_time=FAST),
                      random_bytes=_counter_random())
        images.append(bytes(io.data[:4096 + 256000]))
    assert images[0] == images[1]


@pytest.mark.parametrize("options, text", [
    (LuksCreateOptions(cipher_alg="serpent-256"), "not supported"),
    (LuksCreateOptions(cipher_alg="twofish-128"), "not supported"),
    (LuksCreateOptions(cipher_alg="des", cipher_mode="cbc"), "Algorithm 'des' not supported"),
    (LuksCreateOptions(iter_time=0), "iter-time must be a positive number of milliseconds, not 0"),
    (LuksCreateOptions(iter_time=-5), "too large to scale"),
    (LuksCreateOptions(cipher_alg="aes-128", cipher_mode="cbc", ivgen_alg="essiv",
                       ivgen_hash_alg="sha1"), "No AES cipher with key size 20 available"),
    (LuksCreateOptions(hash_alg="sha3"), "Hash algorithm 'sha3' not supported"),
    (LuksCreateOptions(cipher_alg="cast5-128", cipher_mode="xts", ivgen_alg="plain64"),
     "Unsupported cipher mode xts"),                       # QEMU's text and order
    (LuksCreateOptions(cipher_alg="cast5-128", cipher_mode="xts", ivgen_alg="essiv"),
     "Cipher cast5-128 not supported with essiv"),         # ESSIV is checked first
    (LuksCreateOptions(cipher_alg="des", cipher_mode="xts", ivgen_alg="essiv"),
     "Algorithm 'des' not supported"),                     # the name before everything
    (LuksCreateOptions(cipher_alg="serpent-128", cipher_mode="cbc", ivgen_alg="essiv",
                       ivgen_hash_alg="sha512"), "No Serpent cipher with key size 64 available"),
])
def test_create_refusals(options, text):
    io = MemoryImageIO()
    with pytest.raises(CryptoError, match=text):
        create_volume(io, b"pw", options)
    assert io.size() == 0


def test_close_wipes_the_volume_key():
    volume = create_volume(MemoryImageIO(), b"pw", LuksCreateOptions(iter_time=FAST))
    key = volume.volume_key
    assert any(key)
    volume.close()
    assert not any(key)
    with pytest.raises(CryptoError):
        volume.volume_key
    with pytest.raises(CryptoError):
        volume.cipher.encrypt(0, bytes(512))


def test_no_secret_in_reprs():
    volume = create_volume(MemoryImageIO(), b"hunter2", LuksCreateOptions(iter_time=FAST))
    key_hex = bytes(volume.volume_key).hex()
    for text in (repr(volume), repr(volume.witness), repr(volume.header), str(volume.info())):
        assert key_hex not in text and "hunter2" not in text


def test_create_over_an_old_luks_image_replaces_it():
    io = MemoryImageIO()
    create_volume(io, b"old", LuksCreateOptions(iter_time=FAST))
    create_volume(io, b"new", LuksCreateOptions(iter_time=FAST, cipher_alg="aes-128"))
    assert read_header(io, payload_in_file=False).key_bytes == 32
    with pytest.raises(CryptoError):
        open_volume(io, b"old", payload_in_file=False)
    open_volume(io, b"new", payload_in_file=False).close()


def test_parallel_slot_tries_answer_with_the_lowest_slot_that_opens():
    """Slots are tried in parallel, but the answer is QEMU's: the first slot."""
    from qmpd.crypto.luks import (LuksAmendOptions, LuksCreateOptions, MemoryImageIO,
                                  apply_amend, create_volume, open_volume, prepare_amend)

    io = MemoryImageIO()
    volume = create_volume(io, b"shared", LuksCreateOptions(iter_time=10))
    for slot, passphrase in ((1, b"other"), (2, b"shared"), (3, b"last")):
        apply_amend(prepare_amend(volume, io, LuksAmendOptions(
            state="active", new_secret=passphrase, secret=b"shared", keyslot=slot,
            iter_time=10)), io)
    key = bytes(volume.volume_key)
    for passphrase, slot in ((b"shared", 0), (b"other", 1), (b"last", 3)):
        opened = open_volume(io, passphrase)
        assert bytes(opened.volume_key) == key
        assert opened.witness.slot_index == slot
        opened.close()
    with pytest.raises(CryptoError, match="^Invalid password, cannot unlock any keyslot$"):
        open_volume(io, b"nothing")
