"""SectorCipher's vectorised paths against per-sector references.

The reference encrypts one sector at a time with its own `cryptography`
context, the IVs computed here from their definitions: what SectorCipher
did before the vectorised paths (sector_size 512, iv_shift 0), extended to
LUKS2 sector sizes.  XTS that OpenSSL refuses (aes-192, equal key halves)
is referenced by an XTS written from IEEE 1619 with Python integers, itself
checked against OpenSSL and the standard's vectors.
"""

import hashlib
import os
import random
import threading
from contextlib import contextmanager
from unittest import mock

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings, strategies as st

from qmpd.crypto import ciphers
from qmpd.crypto.ciphers import (
    CIPHER_KEY_LENGTHS, CipherSpec, SectorCipher, check_cipher_supported,
)
from qmpd.crypto.errors import CryptoError

M64 = (1 << 64) - 1
M128 = (1 << 128) - 1


@contextmanager
def path(name):
    """Force the per-sector or the numpy path for every request size."""
    limit = {"auto": None, "numpy": 0, "per-sector": 1 << 62}[name]
    if limit is None:
        yield
        return
    limits = {size: limit for size in (512, 1024, 2048, 4096)}
    with mock.patch.dict(ciphers._PER_SECTOR_MAX,
                         {key: limits for key in ciphers._PER_SECTOR_MAX}):
        yield


PATHS = ["auto", "numpy", "per-sector"]


def supported(spec):
    try:
        check_cipher_supported(spec)
    except CryptoError:
        return False
    return True


# --- the reference -------------------------------------------------------------

def python_xts(key, iv, data, encrypt):
    """IEEE 1619 XTS from its definition (whole blocks), AES-ECB per block."""
    half = len(key) // 2
    tweak = int.from_bytes(
        Cipher(algorithms.AES(key[half:]), modes.ECB()).encryptor().update(iv), "little")
    ecb = Cipher(algorithms.AES(key[:half]), modes.ECB())
    context = ecb.encryptor() if encrypt else ecb.decryptor()
    out = bytearray()
    for i in range(0, len(data), 16):
        mask = tweak.to_bytes(16, "little")
        block = bytes(a ^ b for a, b in zip(data[i:i + 16], mask))
        out += bytes(a ^ b for a, b in zip(context.update(block), mask))
        tweak = ((tweak << 1) & M128) ^ (0x87 if tweak >> 127 else 0)
    return bytes(out)


def algorithm(cipher_alg, key):
    if cipher_alg.startswith("aes-"):
        return algorithms.AES(key)
    return ciphers._algorithm(cipher_alg, bytearray(key))   # cast5, 3des


def reference_iv(spec, key, number):
    niv = spec.iv_length()
    if spec.ivgen_alg == "plain":
        raw = (number & 0xFFFFFFFF).to_bytes(4, "little")
    elif spec.ivgen_alg == "plain64":
        raw = (number & M64).to_bytes(8, "little")
    else:
        essiv_alg = spec.ivgen_cipher_alg()
        salt = hashlib.new(spec.ivgen_hash_alg, key).digest()[:CIPHER_KEY_LENGTHS[essiv_alg]]
        raw = Cipher(algorithms.AES(salt), modes.ECB()).encryptor().update(
            (number & M64).to_bytes(8, "little") + bytes(8))
    return (raw + bytes(niv))[:niv]


def reference_sector(spec, key, iv, chunk, encrypt):
    if spec.cipher_mode == "xts":
        half = len(key) // 2
        if spec.cipher_alg == "aes-192" or key[:half] == key[half:]:
            return python_xts(key, iv, chunk, encrypt)
        mode = modes.XTS(iv)
    elif spec.cipher_mode == "cbc":
        mode = modes.CBC(iv)
    else:
        mode = modes.CTR(iv)
    cipher = Cipher(algorithm(spec.cipher_alg, key), mode)
    context = cipher.encryptor() if encrypt else cipher.decryptor()
    return context.update(chunk) + context.finalize()


def reference(spec, key, first, data, encrypt, sector_size=512, iv_shift=0):
    if spec.cipher_mode == "ecb":
        cipher = Cipher(algorithm(spec.cipher_alg, key), modes.ECB())
        context = cipher.encryptor() if encrypt else cipher.decryptor()
        return context.update(data)
    out = bytearray()
    for k, start in enumerate(range(0, len(data), sector_size)):
        iv = reference_iv(spec, key, (first + k) << iv_shift)
        out += reference_sector(spec, key, iv, data[start:start + sector_size], encrypt)
    return bytes(out)


@pytest.mark.parametrize("nkey", [32, 64])
def test_python_xts_reference_matches_openssl(nkey):
    for _ in range(5):
        key, iv, data = os.urandom(nkey), os.urandom(16), os.urandom(4096)
        for encrypt in (True, False):
            cipher = Cipher(algorithms.AES(key), modes.XTS(iv))
            context = cipher.encryptor() if encrypt else cipher.decryptor()
            assert python_xts(key, iv, data, encrypt) == context.update(data)


# --- IEEE 1619 (Annex B) vectors 1-5: XTS-AES-128, 32-byte keys ------------------

_V4_PTX = bytes(range(256)) * 2
_V4_CTX = bytes.fromhex(
    "27a7479befa1d476489f308cd4cfa6e2a96e4bbe3208ff25287dd3819616e89c"
    "c78cf7f5e543445f8333d8fa7f56000005279fa5d8b5e4ad40e736ddb4d35412"
    "328063fd2aab53e5ea1e0a9f332500a5df9487d07a5c92cc512c8866c7e860ce"
    "93fdf166a24912b422976146ae20ce846bb7dc9ba94a767aaef20c0d61ad0265"
    "5ea92dc4c4e41a8952c651d33174be51a10c421110e6d81588ede82103a252d8"
    "a750e8768defffed9122810aaeb99f9172af82b604dc4b8e51bcb08235a6f434"
    "1332e4ca60482a4ba1a03b3e65008fc5da76b70bf1690db4eae29c5f1badd03c"
    "5ccf2a55d705ddcd86d449511ceb7ec30bf12b1fa35b913f9f747a8afd1b130e"
    "94bff94effd01a91735ca1726acd0b197c4e5b03393697e126826fb6bbde8ecc"
    "1e08298516e2c9ed03ff3c1b7860f6de76d4cecd94c8119855ef5297ca67e9f3"
    "e7ff72b1e99785ca0a7e7720c5b36dc6d72cac9574c8cbbc2f801e23e56fd344"
    "b07f22154beba0f08ce8891e643ed995c94d9a69c9f1b5f499027a78572aeebd"
    "74d20cc39881c213ee770b1010e4bea718846977ae119f7a023ab58cca0ad752"
    "afe656bb3c17256a9f6e9bf19fdd5a38fc82bbe872c5539edb609ef4f79c203e"
    "bb140f2e583cb2ad15b4aa5b655016a8449277dbd477ef2c8d6c017db738b18d"
    "eb4a427d1923ce3ff262735779a418f20a282df920147beabe421ee5319d0568")
_V5_CTX = bytes.fromhex(
    "264d3ca8512194fec312c8c9891f279fefdd608d0c027b60483a3fa811d65ee5"
    "9d52d9e40ec5672d81532b38b6b089ce951f0f9c35590b8b978d175213f329bb"
    "1c2fd30f2f7f30492a61a532a79f51d36f5e31a7c9a12c286082ff7d2394d18f"
    "783e1a8e72c722caaaa52d8f065657d2631fd25bfd8e5baad6e527d763517501"
    "c68c5edc3cdd55435c532d7125c8614deed9adaa3acade5888b87bef641c4c99"
    "4c8091b5bcd387f3963fb5bc37aa922fbfe3df4e5b915e6eb514717bdd2a7407"
    "9a5073f5c4bfd46adf7d282e7a393a52579d11a028da4d9cd9c77124f9648ee3"
    "83b1ac763930e7162a8d37f350b2f74b8472cf09902063c6b32e8c2d9290cefb"
    "d7346d1c779a0df50edcde4531da07b099c638e83a755944df2aef1aa31752fd"
    "323dcb710fb4bfbb9d22b925bc3577e1b8949e729a90bbafeacf7f7879e7b114"
    "7e28ba0bae940db795a61b15ecf4df8db07b824bb062802cc98a9545bb2aaeed"
    "77cb3fc6db15dcd7d80d7d5bc406c4970a3478ada8899b329198eb61c193fb62"
    "75aa8ca340344a75a862aebe92eee1ce032fd950b47d7704a3876923b4ad6284"
    "4bf4a09c4dbe8b4397184b7471360c9564880aedddb9baa4af2e75394b08cd32"
    "ff479c57a07d3eab5d54de5f9738b8d27f27a9f0ab11799d7b7ffefb2704c95c"
    "6ad12c39f1e867a4b7b1d7818a4b753dfd2a89ccb45e001a03a867b187f225dd")
_V4_KEY = bytes.fromhex("27182818284590452353602874713526"
                        "31415926535897932384626433832795")
IEEE1619 = [   # (vector, key1 || key2, data unit sequence number, PTX, CTX)
    (1, bytes(32), 0, bytes(32), bytes.fromhex(
        "917cf69ebd68b2ec9b9fe9a3eadda692cd43d2f59598ed858c02c2652fbf922e")),
    (2, b"\x11" * 16 + b"\x22" * 16, 0x3333333333, b"\x44" * 32, bytes.fromhex(
        "c454185e6a16936e39334038acef838bfb186fff7480adc4289382ecd6d394f0")),
    (3, bytes.fromhex("fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0") + b"\x22" * 16,
     0x3333333333, b"\x44" * 32, bytes.fromhex(
         "af85336b597afc1a900b2eb21ec949d292df4c047e0b21532186a5971a227a89")),
    (4, _V4_KEY, 0, _V4_PTX, _V4_CTX),
    (5, _V4_KEY, 1, _V4_CTX, _V5_CTX),
]


@pytest.mark.parametrize("how", PATHS)
@pytest.mark.parametrize("vector,key,sequence,ptx,ctx", IEEE1619,
                         ids=[f"vector{v[0]}" for v in IEEE1619])
def test_ieee1619_vectors(vector, key, sequence, ptx, ctx, how):
    cipher = SectorCipher(CipherSpec("aes-128", "xts", "plain64"), key)
    with path(how):
        assert cipher.encrypt(sequence, ptx) == ctx
        assert cipher.decrypt(sequence, ctx) == ptx
    iv = sequence.to_bytes(16, "little")
    assert python_xts(key, iv, ptx, True) == ctx
    if key[:16] != key[16:]:   # OpenSSL refuses vector 1's equal halves
        assert Cipher(algorithms.AES(key), modes.XTS(iv)).encryptor().update(ptx) == ctx


# --- property: every path equals the per-sector reference ---------------------------

SPECS = [
    CipherSpec("aes-128", "xts", "plain64"),
    CipherSpec("aes-256", "xts", "plain64"),
    CipherSpec("aes-256", "xts", "plain"),
    CipherSpec("aes-192", "xts", "plain64"),
    CipherSpec("aes-256", "xts", "essiv", "sha256"),
    CipherSpec("aes-128", "xts", "essiv", "sha256"),
    CipherSpec("aes-128", "cbc", "plain"),
    CipherSpec("aes-192", "cbc", "plain64"),
    CipherSpec("aes-256", "cbc", "plain64"),
    CipherSpec("aes-128", "cbc", "essiv", "sha256"),
    CipherSpec("aes-256", "cbc", "essiv", "sha256"),
    CipherSpec("aes-128", "cbc", "essiv", "md5"),
    CipherSpec("cast5-128", "cbc", "plain64"),
    CipherSpec("3des", "cbc", "plain"),
    CipherSpec("aes-256", "ctr", "plain64"),
    CipherSpec("aes-128", "ctr", "plain"),
    CipherSpec("aes-256", "ecb", None),
]
SUPPORTED = [spec for spec in SPECS if supported(spec)]

# Start sectors at the IV generators' wrap points, also after the shift by 3.
SECTORS = st.one_of(
    st.integers(0, 1 << 20),
    st.integers((1 << 32) - 12, (1 << 32) + 4),
    st.integers((1 << 29) - 12, (1 << 29) + 4),
    st.integers((1 << 64) - 12, (1 << 64) + 4),
    st.integers((1 << 61) - 12, (1 << 61) + 4),
)


@settings(max_examples=250, deadline=None)
@given(spec=st.sampled_from(SUPPORTED), how=st.sampled_from(PATHS),
       sector_size=st.sampled_from([512, 1024, 2048, 4096]),
       iv_shift=st.sampled_from([0, 3]), first=SECTORS,
       sectors=st.integers(0, 6), tail=st.integers(0, 255),
       equal_halves=st.booleans(), seed=st.integers(0, 1 << 32))
def test_every_path_equals_the_per_sector_reference(
        spec, how, sector_size, iv_shift, first, sectors, tail, equal_halves, seed):
    rng = random.Random(seed)
    key = rng.randbytes(spec.key_length())
    if spec.cipher_mode == "xts" and equal_halves:
        key = key[:len(key) // 2] * 2
    block = spec.block_size()
    tail = tail % (sector_size // block) * block   # a short last sector, whole blocks
    data = rng.randbytes(sectors * sector_size + tail)
    cipher = SectorCipher(spec, key, sector_size=sector_size, iv_shift=iv_shift)
    expected = reference(spec, key, first, data, True, sector_size, iv_shift)
    with path(how):
        assert cipher.encrypt(first, data) == expected
        assert cipher.decrypt(first, expected) == data
        assert cipher.decrypt(first, data) == reference(
            spec, key, first, data, False, sector_size, iv_shift)


@pytest.mark.parametrize("how", PATHS)
@pytest.mark.parametrize("spec,nkey", [
    (CipherSpec("aes-256", "xts", "plain64"), 64),
    (CipherSpec("aes-192", "cbc", "plain64"), 24),
    (CipherSpec("aes-192", "xts", "plain64"), 48),
    (CipherSpec("aes-128", "cbc", "essiv", "sha256"), 16),
])
def test_key_material_lengths(spec, nkey, how):
    """LUKS1 key material: key length * 4000 stripes, from sector 0."""
    key, material = os.urandom(nkey), os.urandom(nkey * 4000)
    cipher = SectorCipher(spec, key)
    with path(how):
        out = cipher.encrypt(0, material)
        assert out == reference(spec, key, 0, material, True)
        assert cipher.decrypt(0, out) == material


@pytest.mark.parametrize("sector_size,iv_shift", [(512, 0), (4096, 3), (2048, 0)])
@pytest.mark.parametrize("spec", [CipherSpec("aes-256", "xts", "plain64"),
                                  CipherSpec("aes-256", "cbc", "essiv", "sha256")])
def test_requests_larger_than_a_chunk(spec, sector_size, iv_shift):
    key = os.urandom(spec.key_length())
    data = os.urandom((1 << 20) + 3 * sector_size)   # not a whole number of chunks
    first = (1 << 61) - 100
    cipher = SectorCipher(spec, key, sector_size=sector_size, iv_shift=iv_shift)
    expected = reference(spec, key, first, data, True, sector_size, iv_shift)
    assert cipher.encrypt(first, data) == expected
    assert cipher.decrypt(first, expected) == data


def test_luks2_4096_byte_sectors_count_ivs_in_512_byte_units():
    key = os.urandom(64)
    data = os.urandom(3 * 4096)
    cipher = SectorCipher(CipherSpec("aes-256", "xts", "plain64"), key,
                          sector_size=4096, iv_shift=3)
    out = cipher.encrypt(10, data)
    for k in range(3):
        iv = ((10 + k) * 8).to_bytes(16, "little")
        assert out[k * 4096:(k + 1) * 4096] == Cipher(
            algorithms.AES(key), modes.XTS(iv)).encryptor().update(data[k * 4096:(k + 1) * 4096])


def test_equal_halves_and_aes_192_take_the_numpy_path():
    for spec, key in ((CipherSpec("aes-256", "xts", "plain64"), b"\x07" * 64),
                      (CipherSpec("aes-192", "xts", "plain64"), os.urandom(48))):
        cipher = SectorCipher(spec, key)
        assert cipher._algorithm is None
        data = os.urandom(512)
        assert cipher.encrypt(3, data) == reference(spec, key, 3, data, True)


@pytest.mark.parametrize("sector_size", [0, 256, 1000, 8192, 512.0, True])
def test_sector_size_must_be_a_luks2_sector_size(sector_size):
    with pytest.raises(CryptoError) as info:
        SectorCipher(CipherSpec("aes-256", "xts", "plain64"), bytes(range(64)),
                     sector_size=sector_size)
    assert "must be a power of two from 512 to 4096" in str(info.value)


@pytest.mark.parametrize("iv_shift", [-1, 64, 1.5])
def test_iv_shift_range(iv_shift):
    with pytest.raises(CryptoError, match="IV shift"):
        SectorCipher(CipherSpec("aes-256", "xts", "plain64"), bytes(range(64)),
                     iv_shift=iv_shift)


def test_errors_are_unchanged_for_other_sector_sizes():
    cipher = SectorCipher(CipherSpec("aes-256", "xts", "plain64"), os.urandom(64),
                          sector_size=4096)
    with pytest.raises(CryptoError, match="multiple of block size 16"):
        cipher.encrypt(0, bytes(4100))
    with pytest.raises(CryptoError, match="must not be negative"):
        cipher.decrypt(-1, bytes(4096))
    assert cipher.encrypt(0, b"") == b""


@pytest.mark.parametrize("spec", [CipherSpec("aes-256", "xts", "plain64"),
                                  CipherSpec("aes-256", "cbc", "essiv", "sha256"),
                                  CipherSpec("aes-256", "ecb", None)])
def test_scratch_buffers_hold_no_data_after_a_call(spec):
    cipher = SectorCipher(spec, os.urandom(spec.key_length()))
    data = os.urandom(64 * 512 + 16 * 5)
    with path("numpy"):
        cipher.decrypt(0, data)
        cipher.encrypt(0, data)
    # What held plaintext (or plaintext xor the XTS masks) is zeroed; the
    # IVs and masks may stay.
    assert ciphers._pool and all("out" in buffers for buffers in ciphers._pool)
    for buffers in ciphers._pool:
        for slot in ("out", "masked"):
            assert slot not in buffers or not buffers[slot].any(), slot


def test_scratch_pool_is_bounded():
    cipher = SectorCipher(CipherSpec("aes-256", "xts", "plain64"), os.urandom(64))
    data = os.urandom(1 << 20)
    barrier = threading.Barrier(8)

    def run():
        barrier.wait()
        for _ in range(3):
            cipher.decrypt(0, data)

    threads = [threading.Thread(target=run) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert 1 <= len(ciphers._pool) <= ciphers._POOL_MAX


def test_wipe_clears_both_xts_halves():
    cipher = SectorCipher(CipherSpec("aes-256", "xts", "plain64"), os.urandom(64))
    cipher.wipe()
    assert cipher._key == bytes(64)
    assert cipher._ecb_xts._data_key.key == bytes(32)
    assert cipher._ecb_xts._tweak_key.key == bytes(32)
    with pytest.raises(CryptoError, match="wiped"):
        cipher.encrypt(0, bytes(512))


def test_threads_share_an_instance():
    """Scratch buffers are per thread: concurrent requests do not mix."""
    key = os.urandom(64)
    cipher = SectorCipher(CipherSpec("aes-256", "xts", "plain64"), key)
    jobs = [(i * 1000, os.urandom((i + 1) * 64 * 512)) for i in range(4)]
    expected = [reference(cipher.spec, key, first, data, True) for first, data in jobs]
    failures = []

    def run(index):
        first, data = jobs[index]
        for _ in range(20):
            if cipher.encrypt(first, data) != expected[index]:
                failures.append(index)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures


@settings(max_examples=150, deadline=None)
@given(spec=st.sampled_from(SUPPORTED), how=st.sampled_from(PATHS),
       sector_size=st.sampled_from([512, 4096]), iv_shift=st.sampled_from([0, 3]),
       pieces=st.lists(st.tuples(SECTORS, st.integers(0, 9)), min_size=0, max_size=20),
       short_tail=st.booleans(), seed=st.integers(0, 1 << 32))
def test_many_pieces_equal_each_piece_alone(spec, how, sector_size, iv_shift, pieces,
                                            short_tail, seed):
    """decrypt_many/encrypt_many (a burst of NBD reads in one pass) give what
    each (sector, data) gives alone, in order; a piece that is not whole
    sectors (a short final sector) still works, on the one-by-one path."""
    rng = random.Random(seed)
    key = rng.randbytes(spec.key_length())
    cipher = SectorCipher(spec, key, sector_size=sector_size, iv_shift=iv_shift)
    work = [(first, rng.randbytes(n * sector_size)) for first, n in pieces]
    if short_tail and work:
        first, data = work[-1]
        work[-1] = (first, data + rng.randbytes(spec.block_size()))
    with path(how):
        for many, one in ((cipher.encrypt_many, cipher.encrypt),
                          (cipher.decrypt_many, cipher.decrypt)):
            assert many(work) == [one(first, data) for first, data in work]


def test_many_pieces_take_one_vectorised_pass():
    cipher = SectorCipher(CipherSpec("aes-256", "xts", "plain64"), os.urandom(64))
    pieces = [(n * 1000, os.urandom(4096)) for n in range(16)]
    with mock.patch.object(ciphers._EcbXts, "crypt", autospec=True,
                           side_effect=ciphers._EcbXts.crypt) as crypt:
        out = cipher.decrypt_many(pieces)
    assert crypt.call_count == 1
    assert out == [cipher.decrypt(first, data) for first, data in pieces]


def test_many_with_a_wiped_key_fails_as_one_does():
    cipher = SectorCipher(CipherSpec("aes-256", "xts", "plain64"), os.urandom(64))
    cipher.wipe()
    with pytest.raises(CryptoError, match="wiped"):
        cipher.decrypt_many([(0, bytes(4096)), (8, bytes(4096))])
