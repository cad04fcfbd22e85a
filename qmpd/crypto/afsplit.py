"""The LUKS anti-forensic information splitter (AFsplit / AFmerge).

A key of L bytes is stored as `stripes` blocks of L bytes: all but the last
are random, and the last is the key XOR the "diffused" running XOR of the
others, so losing any single bit of the material loses the key.  Diffusion
hashes the block in digest-sized pieces, piece i replaced by
H(big-endian uint32 i || piece) cut to the piece's length (LUKS1 spec,
cryptsetup lib/luks1/af.c, QEMU crypto/afsplit.c).

Speed: merging 4000 stripes of a 64-byte key is about 8000 small hashes
and 4000 XORs.  The XORs run on Python ints (one per stripe) and the hashes
on hashlib's direct constructors, which cost a fraction of a
`cryptography` Hash object per call; both compute the same OpenSSL digests
(the tests check that).  The price: intermediate XOR states live in Python
ints, which cannot be wiped; the inputs and results are bytearrays.
"""

from __future__ import annotations

import hashlib
import os
import struct
from typing import Callable, Protocol

from cryptography.hazmat.primitives import hashes

from qmpd.crypto.errors import CryptoError
from qmpd.crypto.hashes import hash_algorithm, hash_digest_size

LUKS_STRIPES = 4000


class _Digest(Protocol):
    def digest(self) -> bytes: ...


def _hash_constructor(hash_name: str) -> Callable[[bytes], _Digest]:
    """A one-shot hash constructor (object with .digest()), fastest available."""
    algorithm = hash_algorithm(hash_name)  # validates the name (QEMU text)
    constructor = getattr(hashlib, hash_name, None)
    if constructor is not None:
        return constructor
    try:
        hashlib.new(hash_name, b"")
    except (ValueError, TypeError):
        pass
    else:
        return lambda data: hashlib.new(hash_name, data)

    class _CryptographyDigest:
        def __init__(self, data: bytes) -> None:
            self._data = data

        def digest(self) -> bytes:
            digest = hashes.Hash(type(algorithm)())
            digest.update(self._data)
            return digest.finalize()

    return _CryptographyDigest


def _make_diffuser(hash_name: str, block_length: int) -> Callable[[bytes], int]:
    """Diffusion of a block given as bytes, returned as a big-endian int.

    The one- and two-piece cases (every key up to twice the digest size,
    i.e. all LUKS keys with sha256 or longer) are unrolled: merging spends
    its time here.
    """
    new = _hash_constructor(hash_name)
    digest_size = hash_digest_size(hash_name)
    pieces = [
        (struct.pack(">I", i), start, min(start + digest_size, block_length))
        for i, start in enumerate(range(0, block_length, digest_size))
    ]
    from_bytes = int.from_bytes

    if len(pieces) == 1:
        prefix0, _, end0 = pieces[0]

        def diffuse_one(data: bytes) -> int:
            return from_bytes(new(prefix0 + data).digest()[:end0], "big")

        return diffuse_one

    if len(pieces) == 2:
        (prefix0, _, end0), (prefix1, start1, end1) = pieces
        tail = end1 - start1

        def diffuse_two(data: bytes) -> int:
            return from_bytes(
                new(prefix0 + data[:end0]).digest() + new(prefix1 + data[start1:]).digest()[:tail],
                "big",
            )

        return diffuse_two

    def diffuse(data: bytes) -> int:
        return from_bytes(
            b"".join(
                new(prefix + data[start:end]).digest()[: end - start]
                for prefix, start, end in pieces
            ),
            "big",
        )

    return diffuse


def _check(key_length: int, stripes: int) -> None:
    if key_length < 1:
        raise CryptoError(f"AF splitter key length {key_length} must be at least 1")
    if stripes < 1:
        raise CryptoError(f"AF splitter stripes {stripes} must be at least 1")


def af_split(
    hash_name: str,
    key: bytes | bytearray,
    stripes: int,
    random_bytes: Callable[[int], bytes] = os.urandom,
) -> bytearray:
    """Split `key` into len(key) * stripes bytes of AF material."""
    length = len(key)
    _check(length, stripes)
    diffuse = _make_diffuser(hash_name, length)
    out = bytearray(length * stripes)
    block = 0
    for i in range(stripes - 1):
        stripe = random_bytes(length)
        if len(stripe) != length:
            raise CryptoError("AF splitter random source returned a short read")
        out[i * length : (i + 1) * length] = stripe
        block = diffuse((block ^ int.from_bytes(stripe, "big")).to_bytes(length, "big"))
    last = block ^ int.from_bytes(key, "big")
    out[(stripes - 1) * length :] = last.to_bytes(length, "big")
    del block, last
    return out


def af_merge(
    hash_name: str, material: bytes | bytearray, key_length: int, stripes: int
) -> bytearray:
    """Recover the key_length-byte key from its AF material."""
    _check(key_length, stripes)
    if len(material) < key_length * stripes:
        raise CryptoError(
            f"AF material of {len(material)} bytes is shorter than {key_length} * {stripes} stripes"
        )
    diffuse = _make_diffuser(hash_name, key_length)
    view = memoryview(material)
    from_bytes = int.from_bytes
    block = 0
    end = (stripes - 1) * key_length
    for offset in range(0, end, key_length):
        block = diffuse(
            (block ^ from_bytes(view[offset : offset + key_length], "big")).to_bytes(
                key_length, "big"
            )
        )
    key = block ^ from_bytes(view[end : end + key_length], "big")
    view.release()
    out = bytearray(key.to_bytes(key_length, "big"))
    del block, key
    return out
