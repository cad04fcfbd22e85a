"""PBKDF2 and QEMU's "how many iterations fit in iter-time" calibration.

Threads and the GIL: `cryptography`'s PBKDF2HMAC runs in Rust/OpenSSL and
releases the GIL.  Measured on the project machine (2 cores, cryptography
50): PBKDF2-HMAC-SHA256 with 2,000,000 iterations took 0.247 s alone and
0.265 s for two threads running it at the same time, so callers may run
derivations from `trio.to_thread.run_sync` workers in parallel.  That
machine computes about 8-10 M SHA-256 iterations per CPU-second.

Calibration (QEMU's qcrypto_pbkdf2_count_iters) answers "how many
iterations take one second of CPU".  QEMU measures it afresh for every key
slot with millisecond rusage and sometimes gives up with "Unable to get
accurate CPU usage".  Here it is measured once per hash per process, with
the nanosecond thread CPU clock (wall clock as a fallback), over a sample of
at least _SAMPLE_SECONDS, and the result is cached; it cannot fail.  Thread
CPU time is what other processes competing for the cores do not inflate.
"""

from __future__ import annotations

import errno
import math
import os
import threading
import time

from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from qmpd.crypto.errors import CryptoError
from qmpd.crypto.hashes import hash_algorithm, hash_digest_size

UINT32_MAX = 0xFFFFFFFF
UINT64_MAX = 0xFFFFFFFFFFFFFFFF

# crypto/block-luks.c: QCRYPTO_BLOCK_LUKS_MIN_SLOT_KEY_ITERS and
# QCRYPTO_BLOCK_LUKS_MIN_MASTER_KEY_ITERS.
MIN_SLOT_KEY_ITERATIONS = 1000
MIN_MASTER_KEY_ITERATIONS = 1000
# LUKS stores a 20-byte master-key digest (QCRYPTO_BLOCK_LUKS_DIGEST_LEN).
MASTER_KEY_DIGEST_LENGTH = 20

_SAMPLE_SECONDS = 0.05
_FIRST_SAMPLE_ITERATIONS = 1 << 12
_MAX_SAMPLE_ITERATIONS = 1 << 24

_ERANGE_TEXT = os.strerror(errno.ERANGE)   # "Numerical result out of range"

_calibration_lock = threading.Lock()
_hash_locks: dict[str, threading.Lock] = {}
_iterations_per_block_second: dict[str, float] = {}


def pbkdf2(hash_name: str, passphrase: bytes | bytearray, salt: bytes,
           iterations: int, length: int) -> bytearray:
    """PBKDF2-HMAC-<hash_name>; the result is a bytearray the caller wipes."""
    algorithm = hash_algorithm(hash_name)
    if iterations > UINT32_MAX:
        # QEMU's wording (crypto/pbkdf-nettle.c, pbkdf-gnutls.c).
        raise CryptoError(
            f"PBKDF iterations {iterations} must be less than {UINT32_MAX}")
    if iterations < 1:
        raise CryptoError(f"PBKDF iterations {iterations} must be at least 1")
    if length < 1:
        raise CryptoError(f"PBKDF output length {length} must be at least 1")
    kdf = PBKDF2HMAC(algorithm=algorithm, length=length, salt=bytes(salt),
                     iterations=iterations)
    out = bytearray(length)
    derive_into = getattr(kdf, "derive_into", None)
    if derive_into is not None:
        derive_into(passphrase, out)
    else:  # cryptography < 46: the bytes copy cannot be wiped
        out[:] = kdf.derive(bytes(passphrase))
    return out


def _measure_iterations_per_second(hash_name: str) -> float:
    """Iterations of one PBKDF2 output block per CPU-second, for hash_name."""
    digest_size = hash_digest_size(hash_name)
    salt = b"\x5a" * 32
    key = bytearray(b"qmpd calibration passphrase")
    iterations = _FIRST_SAMPLE_ITERATIONS
    while True:
        cpu_start = time.thread_time()
        wall_start = time.perf_counter()
        pbkdf2(hash_name, key, salt, iterations, digest_size)
        cpu = time.thread_time() - cpu_start
        wall = time.perf_counter() - wall_start
        elapsed = cpu if cpu > 0 else wall
        if elapsed >= _SAMPLE_SECONDS:
            return iterations / elapsed
        if iterations >= _MAX_SAMPLE_ITERATIONS:
            # Clocks that barely move: assume the sample took the target
            # time, which errs towards fewer iterations, never an error.
            return iterations / _SAMPLE_SECONDS
        if elapsed <= 0:
            scale = 16.0
        else:
            scale = min(16.0, max(2.0, 1.25 * _SAMPLE_SECONDS / elapsed))
        iterations = min(_MAX_SAMPLE_ITERATIONS, int(iterations * scale))


def _iterations_per_block_second_cached(hash_name: str) -> float:
    hash_algorithm(hash_name)   # unknown/unsupported names fail here, uncached
    with _calibration_lock:
        lock = _hash_locks.setdefault(hash_name, threading.Lock())
    with lock:
        rate = _iterations_per_block_second.get(hash_name)
        if rate is None:
            rate = _measure_iterations_per_second(hash_name)
            _iterations_per_block_second[hash_name] = rate
        return rate


def iterations_per_second(hash_name: str, key_length: int) -> int:
    """QEMU's count_iters: iterations per CPU-second for key_length bytes.

    PBKDF2 runs the whole iteration count once per output block of the hash's
    digest size, so a longer key costs proportionally more.
    """
    blocks = max(1, math.ceil(key_length / hash_digest_size(hash_name)))
    return max(1, int(_iterations_per_block_second_cached(hash_name) / blocks))


def _scaled(hash_name: str, iter_time_ms: int, key_length: int) -> int:
    """iterations_per_second scaled to iter_time_ms, checked like QEMU.

    iter_time_ms is QEMU's uint64: a negative value wraps to a huge one and
    fails the scaling check, as it does in qemu-img; 0 scales to 0.
    """
    per_second = iterations_per_second(hash_name, key_length)
    iter_time = iter_time_ms & UINT64_MAX
    if iter_time and per_second > UINT64_MAX // iter_time:
        raise CryptoError(f"PBKDF iterations {per_second} too large to scale: "
                          f"{_ERANGE_TEXT}")
    return per_second * iter_time // 1000


def _check_uint32(iterations: int) -> None:
    if iterations > UINT32_MAX:
        raise CryptoError(f"PBKDF iterations {iterations} larger than "
                          f"{UINT32_MAX}: {_ERANGE_TEXT}")


def iterations_for_time(hash_name: str, iter_time_ms: int, key_length: int) -> int:
    """Key-slot PBKDF2 iterations that take about iter_time_ms of CPU.

    QEMU's qcrypto_block_luks_store_key arithmetic: at least
    MIN_SLOT_KEY_ITERATIONS (so iter_time_ms=0 gives 1000, as in qemu-img),
    and CryptoError with QEMU's text when the count does not fit the
    header's 32-bit field.
    """
    iterations = _scaled(hash_name, iter_time_ms, key_length)
    _check_uint32(iterations)
    return max(iterations, MIN_SLOT_KEY_ITERATIONS)


def master_key_digest_iterations(hash_name: str, iter_time_ms: int) -> int:
    """Iterations for the header's master-key digest when creating a volume.

    QEMU's qcrypto_block_luks_create: calibrated for the 20-byte digest,
    scaled to iter_time_ms, divided by 8 (as cryptsetup does), at least
    MIN_MASTER_KEY_ITERATIONS.
    """
    iterations = _scaled(hash_name, iter_time_ms, MASTER_KEY_DIGEST_LENGTH) // 8
    _check_uint32(iterations)
    return max(iterations, MIN_MASTER_KEY_ITERATIONS)


def clear_calibration() -> None:
    """Forget every measured rate (tests)."""
    with _calibration_lock:
        _iterations_per_block_second.clear()
