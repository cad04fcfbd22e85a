"""The one Argon2 call: the system's libargon2 when it has one, else argon2-cffi's.

Theory of operation
-------------------
Every Argon2 derivation in qmpd -- a LUKS2 unlock, a new keyslot, the
calibration that times them -- goes through :func:`derive_into`, so the
calibration measures exactly what the unlock runs.

Two builds of the same reference library (version 0x13) can run it:

* the system's ``libargon2.so.1`` (Debian's libargon2-1, which cryptsetup
  links; present wherever cryptsetup is), called through cffi's ABI mode;
* the copy argon2-cffi bundles (``argon2.low_level``), always there.

They compute the same bytes (tests/crypto/test_argon2_kdf.py checks both
against OpenSSL's Argon2id, through `cryptography`, and each other). The system build was
measured faster on the project machine: 4 passes over 1 GiB with 2 lanes,
1.95 s against 2.11 s (best of 3, quiet machine), so cryptsetup's own
unlock is no longer 8 % ahead for the library alone. ``QMPD_ARGON2=bundled``
forces the bundled copy (tests use it to check both).

Both are called with the caller's buffers (``ffi.from_buffer``: the
passphrase is read and the key written in place, no copies a library would
free unwiped), and cffi releases the GIL for the whole C call, which runs
``lanes`` threads of its own.
"""

from __future__ import annotations

import os
from typing import Any

from argon2.low_level import ARGON2_VERSION, Type
from argon2.low_level import ffi as _bundled_ffi
from argon2.low_level import lib as _bundled_lib

TYPES = {"argon2i": Type.I.value, "argon2id": Type.ID.value}
ARGON2_OK = 0

_CDEF = """
int argon2_hash(const uint32_t t_cost, const uint32_t m_cost, const uint32_t parallelism,
                const void *pwd, const size_t pwdlen, const void *salt, const size_t saltlen,
                void *hash, const size_t hashlen, char *encoded, const size_t encodedlen,
                int type, const uint32_t version);
const char *argon2_error_message(int error_code);
"""


def _system() -> tuple[Any, Any] | None:
    """(ffi, lib) of the system's libargon2, or None."""
    if os.environ.get("QMPD_ARGON2") == "bundled":
        return None
    try:
        import cffi

        ffi = cffi.FFI()
        ffi.cdef(_CDEF)
        return ffi, ffi.dlopen("libargon2.so.1")
    except (ImportError, OSError, AttributeError):
        return None


_FFI, _LIB = _system() or (_bundled_ffi, _bundled_lib)
#: Which build runs: "system" or "bundled" (for reports and benchmarks).
BACKEND = "bundled" if _LIB is _bundled_lib else "system"


def derive_into(
    kind: str,
    time_cost: int,
    memory_kib: int,
    lanes: int,
    passphrase: bytes | bytearray,
    salt: bytes,
    out: bytearray,
) -> int:
    """Argon2 (``kind``: argon2i or argon2id) of ``passphrase`` into ``out``.

    Returns libargon2's code (:data:`ARGON2_OK` on success); CPU-heavy and
    GIL-free: call it from a worker thread.
    """
    return hash_with(_FFI, _LIB, kind, time_cost, memory_kib, lanes, passphrase, salt, out)


def hash_with(
    ffi: Any,
    lib: Any,
    kind: str,
    time_cost: int,
    memory_kib: int,
    lanes: int,
    passphrase: bytes | bytearray,
    salt: bytes,
    out: bytearray,
) -> int:
    """:func:`derive_into` through a given build (``ffi``, ``lib``)."""
    secret = passphrase if len(passphrase) else bytearray(1)  # a valid pointer
    return int(
        lib.argon2_hash(
            time_cost,
            memory_kib,
            lanes,
            ffi.from_buffer("uint8_t[]", secret),
            len(passphrase),
            ffi.from_buffer("uint8_t[]", salt),
            len(salt),
            ffi.from_buffer("uint8_t[]", out, require_writable=True),
            len(out),
            ffi.NULL,
            0,
            TYPES[kind],
            ARGON2_VERSION,
        )
    )


def builds() -> dict[str, tuple[Any, Any]]:
    """Every build this machine has, by name (for tests)."""
    found = {"bundled": (_bundled_ffi, _bundled_lib)}
    system = _system()
    if system is not None:
        found["system"] = system
    return found


def error_message(code: int) -> str:
    return str(_FFI.string(_LIB.argon2_error_message(code)).decode("ascii", "replace"))
