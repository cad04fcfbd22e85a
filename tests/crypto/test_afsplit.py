import hashlib
import itertools
import os
import struct
import time

import pytest
from cryptography.hazmat.primitives import hashes
from hypothesis import given, settings, strategies as st

from qmpd.crypto.afsplit import LUKS_STRIPES, _hash_constructor, af_merge, af_split
from qmpd.crypto.errors import CryptoError
from qmpd.crypto.hashes import HASH_NAMES, hash_algorithm, hash_supported

USABLE = [name for name in HASH_NAMES if hash_supported(name)]


def reference_diffuse(name, block):
    """The LUKS1 spec's diffusion, byte by byte, with cryptography's hashes."""
    size = hash_algorithm(name).digest_size
    out = bytearray()
    for i in range(0, len(block), size):
        piece = block[i:i + size]
        digest = hashes.Hash(hash_algorithm(name))
        digest.update(struct.pack(">I", i // size) + piece)
        out += digest.finalize()[:len(piece)]
    return bytes(out)


def reference_split(name, key, stripes, randoms):
    block = bytes(len(key))
    out = bytearray()
    for i in range(stripes - 1):
        stripe = randoms[i]
        out += stripe
        block = reference_diffuse(name, bytes(a ^ b for a, b in zip(block, stripe)))
    out += bytes(a ^ b for a, b in zip(block, key))
    return bytes(out)


def counting_random(length, _counter=itertools.count()):
    seed = next(_counter)
    return hashlib.shake_256(seed.to_bytes(8, "big")).digest(length)


@pytest.mark.parametrize("name", USABLE)
@pytest.mark.parametrize("key_length", [16, 20, 32, 33, 64])
def test_split_matches_the_spec(name, key_length):
    key = os.urandom(key_length)
    randoms = [os.urandom(key_length) for _ in range(7)]
    source = iter(randoms)
    material = af_split(name, key, 8, lambda n: next(source))
    assert isinstance(material, bytearray)
    assert bytes(material) == reference_split(name, key, 8, randoms)
    assert af_merge(name, material, key_length, 8) == key


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(USABLE), key=st.binary(min_size=1, max_size=100),
       stripes=st.integers(min_value=1, max_value=40))
def test_round_trip(name, key, stripes):
    material = af_split(name, key, stripes)
    assert len(material) == len(key) * stripes
    assert af_merge(name, material, len(key), stripes) == key


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(USABLE), key=st.binary(min_size=16, max_size=64),
       flip=st.integers(min_value=0))
def test_any_flipped_bit_loses_the_key(name, key, flip):
    stripes = 4
    material = af_split(name, key, stripes)
    bit = flip % (len(material) * 8)
    material[bit // 8] ^= 1 << (bit % 8)
    assert af_merge(name, material, len(key), stripes) != key


def test_one_stripe_is_the_key_itself():
    assert af_split("sha256", b"k" * 32, 1) == b"k" * 32


@pytest.mark.parametrize("name", USABLE)
def test_fast_hashes_equal_cryptography(name):
    data = os.urandom(68)
    digest = hashes.Hash(hash_algorithm(name))
    digest.update(data)
    assert _hash_constructor(name)(data).digest() == digest.finalize()


def test_luks_sized_merge_is_fast():
    key = os.urandom(64)
    material = af_split("sha256", key, LUKS_STRIPES, counting_random)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        assert af_merge("sha256", material, 64, LUKS_STRIPES) == key
        best = min(best, time.perf_counter() - start)
    # ~10 ms here; generous for a busy CI machine
    assert best < 0.25


def test_errors():
    with pytest.raises(CryptoError, match="Hash algorithm 'md4' not supported"):
        af_split("md4", b"k" * 16, 4)
    with pytest.raises(CryptoError, match="shorter"):
        af_merge("sha256", b"x" * 10, 16, 4)
    with pytest.raises(CryptoError):
        af_split("sha256", b"k" * 16, 0)
    with pytest.raises(CryptoError, match="short read"):
        af_split("sha256", b"k" * 16, 4, lambda n: b"x")
