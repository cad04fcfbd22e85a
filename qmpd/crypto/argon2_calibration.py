"""Argon2 costs for a target time, chosen the way cryptsetup 2.6 chooses them.

Theory of operation
-------------------
cryptsetup (lib/crypto_backend/pbkdf_check.c, crypt_argon2_check) turns a
target time, a memory ceiling and a lane count into a (time cost, memory
cost) pair. Its search ends where, for the measured machine,

* the memory is the ceiling and the time cost is as many passes as fit in
  the target (never fewer than :data:`MIN_TIME_COST`, 4), or
* when even 4 passes over the ceiling take longer than the target, the
  time cost is 4 and the memory is lowered to what 4 passes fit in, never
  below the minimum memory: :data:`MIN_MEMORY_KIB` (32 KiB) or 8 KiB per
  lane, whichever is more (Argon2 needs 8 blocks a lane).

It gets there by measuring: small costs first, memory grown (then
passes) until one derivation takes 250 ms, best of 3 there, then
candidates of the full target length until one lands within 95-110 % of
it. This module does the first step the same way and computes the end
point of the rest in closed form (time ~ passes x memory), skipping the
full-length measurements, which cost a whole ``iter-time`` each. The
first step ends at a sample of at least :data:`SAMPLE_SECONDS` (250 ms)
while memory can still grow, or :data:`CEILING_SAMPLE_SECONDS` once it
is at the ceiling (only passes grow then, and time is linear in them);
the best of :data:`CALIBRATION_SAMPLES` derivations there gives a rate in
KiB-passes per second. That runs once per (kind, memory ceiling, lanes)
per process; every call after that is arithmetic.

The clock is the wall clock (``time.perf_counter``, CLOCK_MONOTONIC), as
cryptsetup's CLOCK_MONOTONIC_RAW: libargon2 computes the lanes of a
derivation in threads of its own, so the calling thread's CPU time sees
only its own lane and process CPU time adds every lane (and every other
thread of the daemon) -- neither is the time a user waits at unlock,
which is what ``iter-time`` means. Wall time is what other processes on a
loaded machine inflate, never deflate, so the best of several short
samples is the estimate closest to the unloaded machine; a loaded machine
can only make the costs cheaper, never dearer than the target.

Why the sample must be large: time per KiB-pass grows with memory
(caches, TLB, fresh pages: on the project machine, 2 lanes, best of 3,
about 0.27-0.33 us at 64 MiB, 0.31-0.36 us at 256 MiB, 0.38-0.42 us at
1 GiB), so a rate from a few MiB would overshoot the target by half at
1 GiB. From a 250 ms sample (about 200 MiB there) the default costs
(2000 ms, 1 GiB, 2 lanes) come out as cryptsetup 2.6.1's benchmark picks
them on that machine, 4 passes over 1 GiB; what error remains makes
derivations a little longer than the target, by at most some 15 %.

What fails and what does not: arguments cryptsetup refuses are refused
here with its message (a :class:`CryptoError`, before anything is
measured). The measurement itself never fails: a derivation that cannot
allocate its memory lowers the ceiling to the largest memory that worked
(the minimum costs, when not even that works); a clock that does not move
over the largest sample gives an assumed rate (:data:`ASSUMED_RATE`, a
slow core's). Both err towards cheaper but valid costs.
cryptsetup would stop with an error there instead; a daemon creating a
keyslot keeps going.

Like cryptsetup, benchmarked memory is capped at half of the physical
memory (:func:`adjusted_physical_memory_kib`). Lanes are taken as given
(the caller chose them, usually :func:`default_argon2_parallel`).

Everything is synchronous and CPU-heavy the first time (about a second at
a 1 GiB ceiling, a few tenths below): call it from a worker thread. The
Argon2 C call releases the GIL. One lock serialises calibrations (two at
once would slow each other down and both measure less than the machine
does); cached rates are read without waiting for it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from qmpd.crypto import argon2_kdf
from qmpd.crypto.errors import CryptoError

UINT32_MAX = 0xFFFFFFFF

# cryptsetup's limits (crypt_pbkdf_get_limits) and defaults (DEFAULT_LUKS2_*).
MIN_TIME_COST = 4
MIN_MEMORY_KIB = 32
MAX_MEMORY_KIB = 4 * 1024 * 1024
MAX_DEFAULT_PARALLEL = 4
DEFAULT_MEMORY_KIB = 1024 * 1024
DEFAULT_ITER_TIME_MS = 2000
#: libargon2's ARGON2_MAX_LANES.
MAX_LANES = 0xFFFFFF

KINDS = argon2_kdf.TYPES

#: A calibration sample below the memory ceiling is at least this long
#: (cryptsetup's BENCH_MIN_MS): memory matters, so the sample grows its
#: memory as far towards the ceiling as this allows.
SAMPLE_SECONDS = 0.25
#: At the ceiling only passes grow, and time is linear in passes: shorter.
CEILING_SAMPLE_SECONDS = 0.05
#: Samples of at least SAMPLE_SECONDS behind a rate; the best counts.
CALIBRATION_SAMPLES = 3
#: Below this a sample grows sixteenfold (cryptsetup's BENCH_MIN_MS_FAST).
_FAST_SECONDS = 0.01
#: Samples never do more work than this (KiB-passes, ~ seconds on any machine).
_MAX_SAMPLE_WORK = 1 << 23
#: The rate assumed when the clock does not move even then: one pass over
#: 1 GiB a second, below what a slow core does (the project machine: 2.5).
ASSUMED_RATE = 1024 * 1024

#: (kind, time cost, memory KiB, lanes) -> wall seconds, or None when the
#: derivation failed (it could not allocate its memory).
Sampler = Callable[[str, int, int, int], "float | None"]


def minimum_memory_kib(parallel: int) -> int:
    """The least memory cryptsetup benchmarks with: 32 KiB, 8 KiB a lane."""
    return max(MIN_MEMORY_KIB, 8 * parallel)


def _physical_memory_kib() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 1024
    except (AttributeError, OSError, ValueError):
        return 0


def adjusted_physical_memory_kib(physical_kib: int | None = None) -> int:
    """cryptsetup's pbkdf_adjusted_phys_memory_kb (2.6): half of the physical
    memory; a figure below 128 MiB, or of KiB beyond 32 bits, is bogus and
    gives the default (1 GiB).

    (cryptsetup 2.7 also halves the free memory on machines without swap.)
    """
    memory = _physical_memory_kib() if physical_kib is None else physical_kib
    if memory < 128 * 1024 or memory > UINT32_MAX:
        return DEFAULT_MEMORY_KIB
    return memory // 2


def default_argon2_memory_kib() -> int:
    """cryptsetup's default memory ceiling: 1 GiB, at most half the RAM."""
    return min(DEFAULT_MEMORY_KIB, adjusted_physical_memory_kib())


def online_cpus() -> int:
    """cryptsetup's crypt_cpusonline: the CPUs online (not this process's affinity)."""
    try:
        count = os.sysconf("SC_NPROCESSORS_ONLN")
    except (AttributeError, OSError, ValueError):
        count = os.cpu_count() or 1
    return max(1, count)


def default_argon2_parallel() -> int:
    """cryptsetup's default lanes: 4, at most the CPUs online."""
    return min(MAX_DEFAULT_PARALLEL, online_cpus())


def check_arguments(kind: str, iter_time_ms: int, memory_kib: int, parallel: int) -> None:
    """Refuse what cryptsetup refuses, with its messages (verify_pbkdf_params,
    crypt_argon2_check)."""
    if kind not in KINDS:
        raise CryptoError(f"Unknown PBKDF type {kind}.")
    if iter_time_ms == 0:
        raise CryptoError("Requested PBKDF target time cannot be zero.")
    if not 0 < iter_time_ms <= UINT32_MAX:
        raise CryptoError(
            f"Requested PBKDF target time {iter_time_ms} ms is out of range (1 to {UINT32_MAX})."
        )
    if memory_kib > MAX_MEMORY_KIB:
        raise CryptoError(
            f"Requested maximum PBKDF memory cost is too high "
            f"(maximum is {MAX_MEMORY_KIB} kilobytes)."
        )
    if memory_kib <= 0:
        raise CryptoError("Requested maximum PBKDF memory cannot be zero.")
    if parallel <= 0:
        raise CryptoError("Requested PBKDF parallel threads cannot be zero.")
    if parallel > MAX_LANES:
        raise CryptoError(
            f"Requested PBKDF parallel threads {parallel} are too many (maximum is {MAX_LANES})."
        )
    if memory_kib < minimum_memory_kib(parallel):
        # crypt_argon2_check's -EINVAL, reported by cryptsetup as:
        raise CryptoError("Not compatible PBKDF options.")


def wall_clock_sample(kind: str, time_cost: int, memory_kib: int, parallel: int) -> float | None:
    """One Argon2 derivation of a 32-byte key, timed on the wall clock.

    The same C call the unlock makes (argon2_hash, GIL released), over a
    fixed non-secret passphrase and salt.
    """
    password = b"qmpd argon2 calibration"
    salt = b"\x5a" * 32
    out = bytearray(32)
    start = time.perf_counter()
    rv = argon2_kdf.derive_into(kind, time_cost, memory_kib, parallel, password, salt, out)
    elapsed = time.perf_counter() - start
    return elapsed if rv == argon2_kdf.ARGON2_OK else None


@dataclass(frozen=True)
class Rate:
    """A calibration: KiB-passes per wall second, and the ceiling it holds for."""

    kib_passes_per_second: float
    ceiling_kib: int  # the memory ceiling, lowered if allocation failed


def costs_from_rate(rate: Rate, iter_time_ms: int, parallel: int) -> tuple[int, int]:
    """cryptsetup's end point (next_argon2_params, iterated) for a rate."""
    minimum = minimum_memory_kib(parallel)
    ceiling = max(minimum, rate.ceiling_kib)
    work = int(rate.kib_passes_per_second * iter_time_ms / 1000)  # KiB-passes
    if work >= MIN_TIME_COST * ceiling:
        return min(UINT32_MAX, work // ceiling), ceiling
    return MIN_TIME_COST, max(minimum, work // MIN_TIME_COST)


class Calibrator:
    """Rates per (kind, ceiling, lanes), measured once with ``sampler``."""

    def __init__(self, sampler: Sampler = wall_clock_sample) -> None:
        self._sampler = sampler
        self._lock = threading.Lock()  # the cache
        self._measuring = threading.Lock()  # one calibration at a time
        self._rates: dict[tuple[str, int, int], Rate] = {}

    def clear(self) -> None:
        with self._lock:
            self._rates.clear()

    def cached(self, kind: str, ceiling_kib: int, parallel: int) -> Rate | None:
        with self._lock:
            return self._rates.get((kind, ceiling_kib, parallel))

    def rate(self, kind: str, ceiling_kib: int, parallel: int) -> Rate:
        key = (kind, ceiling_kib, parallel)
        found = self.cached(*key)
        if found is not None:
            return found
        with self._measuring:
            found = self.cached(*key)
            if found is None:
                found = self._measure(kind, ceiling_kib, parallel)
                with self._lock:
                    self._rates[key] = found
            return found

    def costs(
        self, kind: str, iter_time_ms: int, memory_kib: int, parallel: int
    ) -> tuple[int, int]:
        """See :func:`argon2_costs`."""
        check_arguments(kind, iter_time_ms, memory_kib, parallel)
        ceiling = max(minimum_memory_kib(parallel), min(memory_kib, adjusted_physical_memory_kib()))
        return costs_from_rate(self.rate(kind, ceiling, parallel), iter_time_ms, parallel)

    def _sample(self, kind: str, time_cost: int, memory: int, parallel: int) -> float | None:
        seconds = self._sampler(kind, time_cost, memory, parallel)
        if seconds is None:
            return None
        return max(0.0, seconds)

    def _measure(self, kind: str, ceiling: int, parallel: int) -> Rate:
        """Grow (memory, then passes) to a sample of SAMPLE_SECONDS (at the
        ceiling: CEILING_SAMPLE_SECONDS); best of CALIBRATION_SAMPLES there."""
        minimum = minimum_memory_kib(parallel)
        time_cost, memory = MIN_TIME_COST, minimum
        worked = 0  # the largest memory that derived
        while True:
            seconds = self._sample(kind, time_cost, memory, parallel)
            if seconds is None:
                if worked == 0:  # not even the minimum: the cheapest costs
                    return Rate(0.0, minimum)
                ceiling = memory = worked
                continue
            worked = max(worked, memory)
            goal = CEILING_SAMPLE_SECONDS if memory >= ceiling else SAMPLE_SECONDS
            if seconds >= goal:
                break
            grow = 16.0 if seconds < _FAST_SECONDS else 1.1 * goal / seconds
            if memory < ceiling:
                grown = (
                    time_cost,
                    min(
                        ceiling, max(memory + 1, int(memory * grow)), _MAX_SAMPLE_WORK // time_cost
                    ),
                )
            else:
                grown = (
                    min(
                        max(time_cost + 1, int(time_cost * grow)),
                        max(MIN_TIME_COST, _MAX_SAMPLE_WORK // memory),
                    ),
                    memory,
                )
            if grown == (time_cost, memory):  # the clock barely moves
                return Rate(ASSUMED_RATE, ceiling)
            time_cost, memory = grown
        best = seconds
        for _ in range(CALIBRATION_SAMPLES - 1):
            again = self._sample(kind, time_cost, memory, parallel)
            if again is not None and again > 0:
                best = min(best, again)
        best = max(best, 1e-9)
        return Rate(time_cost * memory / best, ceiling)


_calibrator = Calibrator()


def argon2_costs(kind: str, iter_time_ms: int, memory_kib: int, parallel: int) -> tuple[int, int]:
    """(time cost, memory KiB) of an Argon2 ``kind`` derivation with
    ``parallel`` lanes that takes about ``iter_time_ms`` on this machine,
    with at most ``memory_kib`` (and at most half the RAM), as cryptsetup
    benchmarks them. CryptoError (cryptsetup's texts) for arguments
    cryptsetup refuses; the measurement never fails. The first call for a
    (kind, memory, lanes) measures for up to about a second: worker thread.
    """
    return _calibrator.costs(kind, iter_time_ms, memory_kib, parallel)


def clear_calibration() -> None:
    """Forget every measured rate (tests)."""
    _calibrator.clear()
