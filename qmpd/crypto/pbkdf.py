"""PBKDF2 and QEMU's "how many iterations fit in iter-time" calibration.

Two libraries, chosen per hash and key length (:func:`plan`):

* `cryptography` (OpenSSL) computes the whole key in one call;
* pycryptodome (:mod:`qmpd.crypto.pbkdf_blocks`) computes it in one call,
  or one output block at a time, so that the blocks of one key run on
  several cores: a 64-byte aes-xts-256 slot key is two SHA-256 blocks,
  each a full run of the iterations.

Both release the GIL, so derivations run from worker threads (never the
event loop) in parallel. :data:`PYCRYPTODOME_SPEED` holds the one-block
speed of pycryptodome relative to `cryptography`, measured on the project
machine (2 cores, AMD EPYC with SHA-NI; cryptography 50 with OpenSSL 3,
pycryptodome 4.4; best of 7 runs of 0.1 s, repeated): SHA-224/256 run
1.25-1.28x faster in pycryptodome (its SHA-NI loop), MD5, SHA-1,
SHA-384/512 0.90-0.98x. A plan takes pycryptodome where its wall time per
iteration -- blocks per thread over speed -- beats `cryptography`'s by 5%:
SHA-224/256 always, the other hashes when their key has two blocks or
more and there are two cores or more; RIPEMD-160 stays with
`cryptography` (pycryptodome has no C loop for it). Each block thread runs
to the end even when nobody waits any more (a C call cannot be stopped):
the caller always joins them before it returns, and whoever abandons the
caller (graph.abandonable) wipes what it returns late.

Calibration (QEMU's qcrypto_pbkdf2_count_iters) answers "how many
iterations fit in one second" for a key length. It measures the function
that derives: one block of the library the plan picks, in thread CPU time
(what other processes competing for the cores do not inflate), and
divides by the blocks each thread computes one after another -- a 64-byte
SHA-256 key on two cores costs one block's time, so ``iter-time`` keeps
its meaning (the wait) and gets twice the iterations. A busy machine still
lowers a measured rate (caches, memory, frequency), never raises it, so
the rate is the best of :data:`_CALIBRATION_SAMPLES` short samples of at
least :data:`_SAMPLE_SECONDS`, taken once per hash and library per process,
and every derivation of at least that long counts as one more sample (an
open's slot key is one per block): the figure only goes up, towards what
the machine does unloaded. It cannot fail: frozen clocks fall back to
assumptions that give fewer iterations, never an error.
"""

from __future__ import annotations

import errno
import math
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from qmpd.crypto import pbkdf_blocks
from qmpd.crypto.errors import CryptoError
from qmpd.crypto.hashes import hash_algorithm, hash_digest_size
from qmpd.crypto.secrets import wipe

UINT32_MAX = 0xFFFFFFFF
UINT64_MAX = 0xFFFFFFFFFFFFFFFF

# crypto/block-luks.c: QCRYPTO_BLOCK_LUKS_MIN_SLOT_KEY_ITERS and
# QCRYPTO_BLOCK_LUKS_MIN_MASTER_KEY_ITERS.
MIN_SLOT_KEY_ITERATIONS = 1000
MIN_MASTER_KEY_ITERATIONS = 1000
# LUKS stores a 20-byte master-key digest (QCRYPTO_BLOCK_LUKS_DIGEST_LEN).
MASTER_KEY_DIGEST_LENGTH = 20

CRYPTOGRAPHY = "cryptography"
PYCRYPTODOME = "pycryptodome"

#: One-block PBKDF2 speed of pycryptodome relative to `cryptography` (see above).
PYCRYPTODOME_SPEED = {
    "md5": 0.97,
    "sha1": 0.92,
    "sha224": 1.24,
    "sha256": 1.27,
    "sha384": 0.90,
    "sha512": 0.90,
}
#: pycryptodome is taken only where it is this much faster.
_MARGIN = 1.05
#: Below this many iterations a key's blocks are not worth a thread each.
_PARALLEL_MIN_ITERATIONS = 4096

_SAMPLE_SECONDS = 0.008
_CALIBRATION_SAMPLES = 5
_FIRST_SAMPLE_ITERATIONS = 1 << 12
_MAX_SAMPLE_ITERATIONS = 1 << 24

_ERANGE_TEXT = os.strerror(errno.ERANGE)  # "Numerical result out of range"

_local = threading.local()


def cores() -> int:
    """CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@contextmanager
def single_threaded() -> Iterator[None]:
    """Derivations of this thread use one thread each (the caller runs
    several at once, e.g. one per key slot)."""
    previous = getattr(_local, "threads", None)
    _local.threads = 1
    try:
        yield
    finally:
        _local.threads = previous


@dataclass(frozen=True)
class Plan:
    """How one derivation of ``length`` bytes runs."""

    backend: str  # CRYPTOGRAPHY or PYCRYPTODOME
    threads: int  # threads computing output blocks at once (1: one call, whole key)
    rounds: int  # blocks each thread computes one after another
    cost: float  # wall time per iteration, in one `cryptography` block's


def plan(hash_name: str, length: int, threads: int | None = None) -> Plan:
    """The fastest way to derive ``length`` bytes with at most ``threads``
    threads (default: one inside :func:`single_threaded`, else every core)."""
    blocks = max(1, math.ceil(length / hash_digest_size(hash_name)))
    if threads is None:
        threads = getattr(_local, "threads", None) or cores()
    best = Plan(CRYPTOGRAPHY, 1, blocks, float(blocks))
    speed = PYCRYPTODOME_SPEED.get(hash_name, 0.0)
    if speed > 0 and pbkdf_blocks.available(hash_name):
        workers = max(1, min(blocks, threads))
        if workers > 1 and pbkdf_blocks.block_function(hash_name) is None:
            workers = 1  # the public whole-key call only
        rounds = math.ceil(blocks / workers)
        cost = rounds / speed
        if cost * _MARGIN < best.cost:
            best = Plan(PYCRYPTODOME, workers, rounds, cost)
    return best


def _check(iterations: int, length: int) -> None:
    if iterations > UINT32_MAX:
        # QEMU's wording (crypto/pbkdf-nettle.c, pbkdf-gnutls.c).
        raise CryptoError(f"PBKDF iterations {iterations} must be less than {UINT32_MAX}")
    if iterations < 1:
        raise CryptoError(f"PBKDF iterations {iterations} must be at least 1")
    if length < 1:
        raise CryptoError(f"PBKDF output length {length} must be at least 1")


def pbkdf2(
    hash_name: str, passphrase: bytes | bytearray, salt: bytes, iterations: int, length: int
) -> bytearray:
    """PBKDF2-HMAC-<hash_name>; the result is a bytearray the caller wipes."""
    hash_algorithm(hash_name)  # unknown or unsupported names fail here
    _check(iterations, length)
    return derive(plan(hash_name, length), hash_name, passphrase, salt, iterations, length)


def derive(
    how: Plan,
    hash_name: str,
    passphrase: bytes | bytearray,
    salt: bytes,
    iterations: int,
    length: int,
) -> bytearray:
    """:func:`pbkdf2` along a given plan (tests take every path with it)."""
    out = bytearray(length)
    salt = bytes(salt)
    try:
        if how.backend == CRYPTOGRAPHY:
            _derive_cryptography(hash_name, passphrase, salt, iterations, out)
        else:
            block = pbkdf_blocks.block_function(hash_name) if how.threads > 1 else None
            if block is None:
                _derive_whole(hash_name, passphrase, salt, iterations, out)
            else:
                threads = how.threads if iterations >= _PARALLEL_MIN_ITERATIONS else 1
                _derive_blocks(block, hash_name, passphrase, salt, iterations, out, threads)
    except BaseException:
        wipe(out)
        raise
    return out


def _blocks_of(hash_name: str, length: int) -> int:
    return max(1, math.ceil(length / hash_digest_size(hash_name)))


def _cryptography_into(
    hash_name: str, passphrase: bytes | bytearray, salt: bytes, iterations: int, out: bytearray
) -> None:
    kdf = PBKDF2HMAC(
        algorithm=hash_algorithm(hash_name), length=len(out), salt=salt, iterations=iterations
    )
    derive_into = getattr(kdf, "derive_into", None)
    if derive_into is not None:
        derive_into(passphrase, out)
    else:  # cryptography < 46: the bytes copy cannot be wiped
        out[:] = kdf.derive(bytes(passphrase))


def _derive_cryptography(
    hash_name: str, passphrase: bytes | bytearray, salt: bytes, iterations: int, out: bytearray
) -> None:
    start = time.thread_time()
    _cryptography_into(hash_name, passphrase, salt, iterations, out)
    _record(
        hash_name,
        CRYPTOGRAPHY,
        iterations * _blocks_of(hash_name, len(out)),
        time.thread_time() - start,
    )


def _derive_whole(
    hash_name: str, passphrase: bytes | bytearray, salt: bytes, iterations: int, out: bytearray
) -> None:
    start = time.thread_time()
    out[:] = pbkdf_blocks.whole_key(hash_name, passphrase, salt, iterations, len(out))
    _record(
        hash_name,
        PYCRYPTODOME,
        iterations * _blocks_of(hash_name, len(out)),
        time.thread_time() - start,
    )


def _derive_blocks(
    block: pbkdf_blocks.BlockFunction,
    hash_name: str,
    passphrase: bytes | bytearray,
    salt: bytes,
    iterations: int,
    out: bytearray,
    threads: int,
) -> None:
    """Output blocks 1..n of ``out``, thread k computing blocks k+1, k+1+threads, ...

    The calling thread takes the first share; it always joins the others
    before it returns or raises, so nothing writes into ``out`` afterwards.
    """
    size = hash_digest_size(hash_name)
    count = _blocks_of(hash_name, len(out))
    threads = max(1, min(threads, count))
    errors: list[BaseException] = []

    def work(first: int) -> None:
        try:
            for index in range(first, count + 1, threads):
                start = time.thread_time()
                value = block(passphrase, salt, iterations, index)
                _record(hash_name, PYCRYPTODOME, iterations, time.thread_time() - start)
                offset = (index - 1) * size
                out[offset : offset + size] = value[: len(out) - offset]
        except BaseException as exc:  # raised in the caller, after the join
            errors.append(exc)

    started: list[threading.Thread] = []
    mine = [1]
    try:
        for first in range(2, threads + 1):
            helper = threading.Thread(target=work, args=(first,), daemon=True, name="pbkdf2-block")
            try:
                helper.start()
            except RuntimeError:  # no thread to be had: the caller does that share
                mine.append(first)
            else:
                started.append(helper)
        for first in mine:
            work(first)
    finally:
        for helper in started:
            helper.join()
    if errors:
        raise errors[0]


# -- calibration -----------------------------------------------------------------


@dataclass
class _Rate:
    best: float = 0.0  # iterations of one block per thread CPU-second
    samples: int = 0  # samples of at least _SAMPLE_SECONDS behind it


_calibration_lock = threading.Lock()
_key_locks: dict[tuple[str, str], threading.Lock] = {}
_rates: dict[tuple[str, str], _Rate] = {}


def _record(hash_name: str, backend: str, iterations: int, cpu_seconds: float) -> None:
    """A derivation of ``iterations`` block-iterations took ``cpu_seconds``."""
    if cpu_seconds < _SAMPLE_SECONDS:
        return
    with _calibration_lock:
        rate = _rates.setdefault((hash_name, backend), _Rate())
        rate.samples += 1
        rate.best = max(rate.best, iterations / cpu_seconds)


def _one_block(hash_name: str, backend: str, iterations: int) -> None:
    """One output block, the way the derivations of ``backend`` compute it."""
    salt = b"\x5a" * 32
    key = bytearray(b"qmpd calibration passphrase")
    size = hash_digest_size(hash_name)
    if backend == CRYPTOGRAPHY:
        _cryptography_into(hash_name, key, salt, iterations, bytearray(size))
        return
    block = pbkdf_blocks.block_function(hash_name)
    if block is not None:
        block(key, salt, iterations, 1)
    else:
        pbkdf_blocks.whole_key(hash_name, key, salt, iterations, size)


def _sample(hash_name: str, backend: str, iterations: int) -> float:
    """Seconds one block of ``iterations`` takes: thread CPU time, else wall time."""
    cpu_start = time.thread_time()
    wall_start = time.perf_counter()
    _one_block(hash_name, backend, iterations)
    cpu = time.thread_time() - cpu_start
    wall = time.perf_counter() - wall_start
    return cpu if cpu > 0 else wall


def _measure_iterations_per_second(
    hash_name: str, backend: str, samples: int = _CALIBRATION_SAMPLES, start_rate: float = 0.0
) -> float:
    """The best rate (one-block iterations per CPU-second) of ``samples`` samples.

    Each counted sample lasts at least _SAMPLE_SECONDS; shorter ones only
    size the next. ``start_rate`` (a rate already seen) sizes the first.
    """
    if start_rate > 0:
        iterations = int(start_rate * _SAMPLE_SECONDS * 1.25)
    else:
        iterations = _FIRST_SAMPLE_ITERATIONS
    iterations = max(_FIRST_SAMPLE_ITERATIONS, min(_MAX_SAMPLE_ITERATIONS, iterations))
    best = 0.0
    taken = 0
    while taken < samples:
        elapsed = _sample(hash_name, backend, iterations)
        if elapsed >= _SAMPLE_SECONDS:
            best = max(best, iterations / elapsed)
            taken += 1
            continue
        if iterations >= _MAX_SAMPLE_ITERATIONS:
            # Clocks that barely move: assume the sample took the target
            # time, which errs towards fewer iterations, never an error.
            return max(best, iterations / _SAMPLE_SECONDS)
        if elapsed <= 0:
            scale = 16.0
        else:
            scale = min(16.0, max(2.0, 1.25 * _SAMPLE_SECONDS / elapsed))
        iterations = min(_MAX_SAMPLE_ITERATIONS, int(iterations * scale))
    return best


def _iterations_per_block_second(hash_name: str, backend: str) -> float:
    """The calibrated rate of ``backend`` for one block; measured once."""
    key = (hash_name, backend)
    with _calibration_lock:
        lock = _key_locks.setdefault(key, threading.Lock())
    with lock:
        with _calibration_lock:
            seen = _rates.get(key)
            best, count = (seen.best, seen.samples) if seen else (0.0, 0)
        if count < _CALIBRATION_SAMPLES:
            measured = _measure_iterations_per_second(
                hash_name, backend, _CALIBRATION_SAMPLES - count, best
            )
            with _calibration_lock:
                rate = _rates.setdefault(key, _Rate())
                rate.best = max(rate.best, measured)
                rate.samples = max(rate.samples, _CALIBRATION_SAMPLES)
        with _calibration_lock:
            return _rates[key].best


def iterations_per_second(hash_name: str, key_length: int) -> int:
    """QEMU's count_iters: iterations that take one second for key_length bytes.

    PBKDF2 runs the whole iteration count once per output block of the
    hash's digest size; a key whose blocks run on several threads costs the
    blocks of one thread (:attr:`Plan.rounds`).
    """
    hash_algorithm(hash_name)  # unknown/unsupported names fail here, uncached
    how = plan(hash_name, key_length)
    return max(1, int(_iterations_per_block_second(hash_name, how.backend) / how.rounds))


def _scaled(hash_name: str, iter_time_ms: int, key_length: int) -> int:
    """iterations_per_second scaled to iter_time_ms, checked like QEMU.

    iter_time_ms is QEMU's uint64: a negative value wraps to a huge one and
    fails the scaling check, as it does in qemu-img; 0 scales to 0.
    """
    per_second = iterations_per_second(hash_name, key_length)
    iter_time = iter_time_ms & UINT64_MAX
    if iter_time and per_second > UINT64_MAX // iter_time:
        raise CryptoError(f"PBKDF iterations {per_second} too large to scale: {_ERANGE_TEXT}")
    return per_second * iter_time // 1000


def _check_uint32(iterations: int) -> None:
    if iterations > UINT32_MAX:
        raise CryptoError(f"PBKDF iterations {iterations} larger than {UINT32_MAX}: {_ERANGE_TEXT}")


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
        _rates.clear()
