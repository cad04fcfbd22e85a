"""Hash algorithms by their QEMU names (QCryptoHashAlgorithm).

LUKS headers and QMP options name hashes the way QEMU's QAPI enum does
("sha256", "ripemd160", ...).  This module maps those names onto
`cryptography` hash objects, and says clearly when a name is unknown or
when the installed OpenSSL cannot compute it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from cryptography.hazmat.primitives import hashes

from qmpd.crypto.errors import CryptoError

HASH_NAMES: tuple[str, ...] = (
    "md5",
    "sha1",
    "sha224",
    "sha256",
    "sha384",
    "sha512",
    "ripemd160",
)

# QEMU's qcrypto_hash_digest_len table: sizes are facts of the algorithms,
# known even when the library cannot compute the hash.
_DIGEST_SIZES = {
    "md5": 16,
    "sha1": 20,
    "sha224": 28,
    "sha256": 32,
    "sha384": 48,
    "sha512": 64,
    "ripemd160": 20,
}


class _RIPEMD160(hashes.HashAlgorithm):
    """RIPEMD-160, which `cryptography` does not name but OpenSSL may offer.

    cryptography looks digests up in OpenSSL by ``name``; whether OpenSSL
    has it (legacy provider or not) is probed once, see _ripemd160_offered.
    """

    name = "ripemd160"
    digest_size = 20
    block_size = 64


_FACTORIES: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "md5": hashes.MD5,
    "sha1": hashes.SHA1,
    "sha224": hashes.SHA224,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
    "ripemd160": _RIPEMD160,
}

_probe_lock = threading.Lock()
_ripemd160_probe: bool | None = None


def _ripemd160_offered() -> bool:
    global _ripemd160_probe
    with _probe_lock:
        if _ripemd160_probe is None:
            try:
                digest = hashes.Hash(_RIPEMD160())
                digest.update(b"abc")
                # Known answer from the RIPEMD-160 reference vectors.
                _ripemd160_probe = digest.finalize().hex() == (
                    "8eb208f7e05d987a9b044a8e98c6b087f15a0bfc"
                )
            except Exception:  # UnsupportedAlgorithm, or any backend refusal
                _ripemd160_probe = False
        return _ripemd160_probe


def _check_name(name: str) -> None:
    if name not in _DIGEST_SIZES:
        # QEMU's wording (crypto/block-luks.c, name lookup).
        raise CryptoError(f"Hash algorithm '{name}' not supported")


def hash_algorithm(name: str) -> hashes.HashAlgorithm:
    """A fresh `cryptography` hash object for a QEMU hash name."""
    _check_name(name)
    if name == "ripemd160" and not _ripemd160_offered():
        raise CryptoError("Hash algorithm 'ripemd160' not supported by the installed OpenSSL")
    return _FACTORIES[name]()


def hash_digest_size(name: str) -> int:
    """Digest length in bytes (QEMU's qcrypto_hash_digest_len)."""
    _check_name(name)
    return _DIGEST_SIZES[name]


def hash_supported(name: str) -> bool:
    """True if `name` is a QEMU hash name this installation can compute."""
    try:
        hash_algorithm(name)
    except CryptoError:
        return False
    return True
