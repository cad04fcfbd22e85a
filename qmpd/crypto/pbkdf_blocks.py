"""PBKDF2-HMAC through pycryptodome, the whole key or one output block.

PBKDF2's output is T_1 || T_2 || ... (RFC 8018 §5.2), and each block
T_i = U_1 ^ U_2 ^ ... ^ U_c with U_1 = HMAC(P, S || INT(i)) and
U_j = HMAC(P, U_(j-1)): the blocks are independent runs that differ only in
the INT(i) inside the first HMAC, so the two 32-byte blocks of a 64-byte
SHA-256 key can be computed on two cores. pycryptodome's public
``Crypto.Protocol.KDF.PBKDF2`` computes them one after another and appends
INT(i) itself, so no salt given to it yields block 2 alone. Inside, for
each block, it keys an HMAC object on the password, computes U_1 in Python
and hands the c - 1 remaining HMACs and the XOR to a C helper,
``HMAC._pbkdf2_hmac_assist(U_1, c)`` (which calls the hash module's
``_pbkdf2_hmac_assist``); the C call releases the GIL.

This module is the only place that calls that non-public helper.
:func:`block_function` checks it once per hash against the public PBKDF2
(three blocks, a few iterations) and returns None if it is missing, raises
or answers differently; callers then use :func:`whole_key`, the public call,
which computes the same bytes on one thread. Tested with pycryptodome 3.20.0,
3.23.0 and 4.4.0 (pyproject.toml pins that range).

Secrets: pycryptodome copies the password into ``bytes`` (the padded HMAC
key) and returns ``bytes``; neither copy can be wiped, as with
``cryptography`` before 46. Callers copy the result into a bytearray they
wipe.
"""

from __future__ import annotations

import importlib
import struct
import threading
from typing import Callable

#: QEMU hash names -> pycryptodome modules that have a C PBKDF2 loop.
#: RIPEMD-160 is missing on purpose: pycryptodome has no C loop for it, and
#: its pure-Python fallback is about 100 times slower than OpenSSL's.
MODULES = {
    "md5": "Crypto.Hash.MD5",
    "sha1": "Crypto.Hash.SHA1",
    "sha224": "Crypto.Hash.SHA224",
    "sha256": "Crypto.Hash.SHA256",
    "sha384": "Crypto.Hash.SHA384",
    "sha512": "Crypto.Hash.SHA512",
}

BlockFunction = Callable[[bytes | bytearray, bytes, int, int], bytes]

_lock = threading.Lock()
_modules: dict[str, object | None] = {}
_blocks: dict[str, BlockFunction | None] = {}


def _module(hash_name: str):
    with _lock:
        if hash_name not in _modules:
            module = None
            name = MODULES.get(hash_name)
            if name is not None:
                try:
                    module = importlib.import_module(name)
                    importlib.import_module("Crypto.Hash.HMAC")
                    importlib.import_module("Crypto.Protocol.KDF")
                except ImportError:
                    module = None
            # Without its C loop pycryptodome would run PBKDF2 in Python.
            if module is not None and not hasattr(module, "_pbkdf2_hmac_assist"):
                module = None
            _modules[hash_name] = module
        return _modules[hash_name]


def available(hash_name: str) -> bool:
    """True if pycryptodome is installed and has a C PBKDF2 loop for the hash."""
    return _module(hash_name) is not None


def whole_key(
    hash_name: str, password: bytes | bytearray, salt: bytes, iterations: int, length: int
) -> bytes:
    """The public Crypto.Protocol.KDF.PBKDF2: all blocks, one after another."""
    from Crypto.Protocol.KDF import PBKDF2

    module = _module(hash_name)
    if module is None:  # never PBKDF2's default hash instead
        raise ValueError(f"pycryptodome has no PBKDF2 loop for {hash_name}")
    return PBKDF2(password, salt, length, count=iterations, hmac_hash_module=module)


def _make_block_function(module) -> BlockFunction:
    from Crypto.Hash import HMAC

    def block(password: bytes | bytearray, salt: bytes, iterations: int, index: int) -> bytes:
        """T_index (1-based), as Crypto.Protocol.KDF.PBKDF2 computes it."""
        base = HMAC.new(password, b"", module)
        first = base.copy().update(salt + struct.pack(">I", index)).digest()
        return base._pbkdf2_hmac_assist(first, iterations)

    return block


def _self_test(hash_name: str, block: BlockFunction) -> bool:
    module = _module(hash_name)
    size = module.digest_size
    password, salt, iterations = b"qmpd block check", b"\x01salt\x00" * 5, 3
    try:
        expected = whole_key(hash_name, password, salt, iterations, 3 * size)
        got = b"".join(block(bytearray(password), salt, iterations, i) for i in (1, 2, 3))
    except Exception:  # a changed private helper: use the public call instead
        return False
    return got == expected


def block_function(hash_name: str) -> BlockFunction | None:
    """``block(password, salt, iterations, index)`` -> T_index, or None.

    None when pycryptodome lacks the hash or its non-public helper no longer
    behaves as the public PBKDF2 does (checked once per hash).
    """
    with _lock:
        if hash_name in _blocks:
            return _blocks[hash_name]
    module = _module(hash_name)
    block = None
    if module is not None:
        candidate = _make_block_function(module)
        if _self_test(hash_name, candidate):
            block = candidate
    with _lock:
        return _blocks.setdefault(hash_name, block)


def forget() -> None:
    """Drop the cached checks (tests)."""
    with _lock:
        _modules.clear()
        _blocks.clear()


# Import pycryptodome now, with the daemon's start-up: its modules parse C
# declarations holding the GIL (about 30 ms), which a first derivation
# would otherwise do while the event loop serves other sessions.
for _name in MODULES:
    _module(_name)
