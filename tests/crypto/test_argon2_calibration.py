import os
import threading
import time

import pytest

from qmpd.crypto import argon2_calibration as calibration
from qmpd.crypto.argon2_calibration import (
    CALIBRATION_SAMPLES,
    DEFAULT_MEMORY_KIB,
    MIN_MEMORY_KIB,
    MIN_TIME_COST,
    Calibrator,
    Rate,
    adjusted_physical_memory_kib,
    argon2_costs,
    costs_from_rate,
    default_argon2_memory_kib,
    default_argon2_parallel,
    wall_clock_sample,
)
from qmpd.crypto.errors import CryptoError

MiB = 1024


class FakeMachine:
    """Argon2 that takes passes x memory / rate seconds (KiB-passes per second)."""

    def __init__(self, rate: float, *, fail_above: int | None = None,
                 noise: list[float] | None = None) -> None:
        self.rate = rate
        self.fail_above = fail_above
        self.noise = list(noise or [])
        self.calls: list[tuple[str, int, int, int]] = []

    def __call__(self, kind: str, time_cost: int, memory: int, parallel: int) -> float | None:
        self.calls.append((kind, time_cost, memory, parallel))
        if self.fail_above is not None and memory > self.fail_above:
            return None
        seconds = time_cost * memory / self.rate
        if self.noise:
            seconds *= self.noise.pop(0)
        return seconds


@pytest.fixture(autouse=True)
def big_machine(monkeypatch):
    # Ceilings in these tests are not capped by the test machine's RAM.
    monkeypatch.setattr(calibration, "_physical_memory_kib", lambda: 64 * 1024 * MiB)


def test_memory_at_ceiling_and_passes_fill_the_target():
    machine = FakeMachine(rate=3_000_000)           # 3M KiB-passes per second
    costs = Calibrator(machine).costs("argon2id", 2000, 1024 * MiB, 4)
    # 6M KiB-passes in 2 s over a 1 GiB ceiling: 5.72 -> 5 passes.
    assert costs == (5, 1024 * MiB)


def test_memory_lowered_when_the_minimum_passes_exceed_the_target():
    machine = FakeMachine(rate=1024 * MiB)        # one pass over 1 GiB a second
    time_cost, memory = Calibrator(machine).costs("argon2i", 2000, 1024 * MiB, 2)
    # 4 passes over 1 GiB would take 4 s: 4 passes over 512 MiB take 2.
    assert (time_cost, memory) == (MIN_TIME_COST, 512 * MiB)


def test_minimums_on_a_slow_machine():
    slow = FakeMachine(rate=10)
    assert Calibrator(slow).costs("argon2id", 1, 1024 * MiB, 1) == (4, MIN_MEMORY_KIB)
    # 8 KiB a lane: 8 lanes need 64 KiB.
    assert Calibrator(slow).costs("argon2id", 1, 1024 * MiB, 8) == (4, 64)


def test_small_ceiling_grows_passes_not_memory():
    machine = FakeMachine(rate=2_000_000)
    time_cost, memory = Calibrator(machine).costs("argon2id", 100, 32, 1)
    assert memory == 32
    assert time_cost == 200_000 // 32
    assert all(call[2] <= 32 for call in machine.calls)


def test_calibrated_once_per_kind_memory_and_lanes():
    machine = FakeMachine(rate=2_000_000)
    calibrator = Calibrator(machine)
    first = calibrator.costs("argon2id", 2000, 64 * MiB, 2)
    measured = len(machine.calls)
    assert measured >= CALIBRATION_SAMPLES
    assert first == (4_000_000 // (64 * MiB), 64 * MiB)
    assert calibrator.costs("argon2id", 500, 64 * MiB, 2) == (1_000_000 // (64 * MiB), 64 * MiB)
    assert calibrator.costs("argon2id", 2000, 64 * MiB, 2) == first
    assert len(machine.calls) == measured          # no new samples
    calibrator.costs("argon2id", 2000, 64 * MiB, 1)      # other lanes
    after_lanes = len(machine.calls)
    assert after_lanes > measured
    calibrator.costs("argon2i", 2000, 64 * MiB, 1)       # other kind
    after_kind = len(machine.calls)
    assert after_kind > after_lanes
    calibrator.costs("argon2i", 2000, 32 * MiB, 1)       # other ceiling
    assert len(machine.calls) > after_kind
    calibrator.clear()
    count = len(machine.calls)
    calibrator.costs("argon2id", 2000, 64 * MiB, 2)
    assert len(machine.calls) > count


def test_the_best_sample_counts():
    # The samples at the final point are inflated by load, one of them
    # least: the rate is that one's.
    growth = len(_calls_of(FakeMachine(rate=1_000_000))) - CALIBRATION_SAMPLES
    machine = FakeMachine(rate=1_000_000, noise=[1.0] * growth + [3.0, 1.5, 2.0])
    rate = Calibrator(machine).rate("argon2id", 32, 1)
    assert rate.kib_passes_per_second == pytest.approx(1_000_000 / 1.5, rel=1e-9)
    assert len(machine.calls) == growth + CALIBRATION_SAMPLES


def _calls_of(machine: FakeMachine) -> list:
    Calibrator(machine).rate("argon2id", 32, 1)
    return machine.calls


def test_sample_grows_to_the_sample_length():
    machine = FakeMachine(rate=1_000_000)
    Calibrator(machine).rate("argon2id", 1024 * MiB, 2)
    _, time_cost, memory, _ = machine.calls[-1]
    seconds = time_cost * memory / 1_000_000
    assert memory < 1024 * MiB
    assert calibration.SAMPLE_SECONDS <= seconds < 2 * calibration.SAMPLE_SECONDS
    assert time_cost == MIN_TIME_COST     # memory grows before passes


def test_allocation_failure_lowers_the_ceiling():
    machine = FakeMachine(rate=1e12, fail_above=8 * MiB)
    calibrator = Calibrator(machine)
    rate = calibrator.rate("argon2id", 1024 * MiB, 2)
    assert rate.ceiling_kib <= 8 * MiB
    time_cost, memory = calibrator.costs("argon2id", 2000, 1024 * MiB, 2)
    assert memory == rate.ceiling_kib
    assert time_cost >= MIN_TIME_COST


def test_failure_even_at_the_minimum_gives_the_minimum_costs():
    machine = FakeMachine(rate=1e6, fail_above=0)
    assert Calibrator(machine).costs("argon2id", 2000, 1024 * MiB, 2) == (4, MIN_MEMORY_KIB)


def test_frozen_clock_ends_with_valid_costs():
    samples = []

    def frozen(kind, time_cost, memory, parallel):
        samples.append((time_cost, memory))
        return 0.0

    calibrator = Calibrator(frozen)
    assert calibrator.rate("argon2id", 1024 * MiB, 2).kib_passes_per_second == \
        calibration.ASSUMED_RATE
    assert len(samples) < 40
    assert max(t * m for t, m in samples) <= calibration._MAX_SAMPLE_WORK
    # The assumed rate: 2 GiB-passes in 2 s, 4 passes over 512 MiB.
    assert calibrator.costs("argon2id", 2000, 1024 * MiB, 2) == (4, 512 * MiB)


def test_costs_from_rate_closed_form():
    assert costs_from_rate(Rate(4096.0, 1024), 1000, 1) == (4, 1024)
    assert costs_from_rate(Rate(4095.0, 1024), 1000, 1) == (4, 1023)
    assert costs_from_rate(Rate(10_000.0, 1024), 1000, 1) == (9, 1024)
    assert costs_from_rate(Rate(1e30, 1024), 1000, 1) == (0xFFFFFFFF, 1024)
    assert costs_from_rate(Rate(0.0, 1024), 1000, 4) == (4, 32)


@pytest.mark.parametrize("args, text", [
    (("pbkdf2", 2000, 1024, 1), "Unknown PBKDF type pbkdf2."),
    (("argon2", 2000, 1024, 1), "Unknown PBKDF type argon2."),
    (("argon2id", 0, 1024, 1), "Requested PBKDF target time cannot be zero."),
    (("argon2id", -1, 1024, 1), "out of range"),
    (("argon2id", 2000, 0, 1), "Requested maximum PBKDF memory cannot be zero."),
    (("argon2id", 2000, 4 * 1024 * MiB + 1, 1),
     "Requested maximum PBKDF memory cost is too high (maximum is 4194304 kilobytes)."),
    (("argon2id", 2000, 1024, 0), "Requested PBKDF parallel threads cannot be zero."),
    (("argon2id", 2000, 31, 1), "Not compatible PBKDF options."),
    (("argon2id", 2000, 63, 8), "Not compatible PBKDF options."),
])
def test_arguments_cryptsetup_refuses(args, text):
    machine = FakeMachine(rate=1e6)
    with pytest.raises(CryptoError) as err:
        Calibrator(machine).costs(*args)
    assert text in str(err.value)
    assert machine.calls == []


def test_memory_capped_at_half_the_ram(monkeypatch):
    monkeypatch.setattr(calibration, "_physical_memory_kib", lambda: 512 * MiB)
    machine = FakeMachine(rate=1e12)
    assert Calibrator(machine).costs("argon2id", 2000, 1024 * MiB, 1)[1] == 256 * MiB
    assert max(call[2] for call in machine.calls) <= 256 * MiB


def test_physical_memory_adjustment():
    assert adjusted_physical_memory_kib(8 * 1024 * MiB) == 4 * 1024 * MiB
    assert adjusted_physical_memory_kib(1024 * MiB) == 512 * MiB
    assert adjusted_physical_memory_kib(100 * MiB) == DEFAULT_MEMORY_KIB   # bogus
    assert adjusted_physical_memory_kib(1 << 40) == DEFAULT_MEMORY_KIB    # bogus


def test_defaults(monkeypatch):
    assert default_argon2_parallel() == min(4, os.sysconf("SC_NPROCESSORS_ONLN"))
    assert default_argon2_memory_kib() == DEFAULT_MEMORY_KIB
    monkeypatch.setattr(calibration, "_physical_memory_kib", lambda: 1024 * MiB)
    assert default_argon2_memory_kib() == 512 * MiB
    monkeypatch.setattr(calibration, "online_cpus", lambda: 16)
    assert default_argon2_parallel() == 4
    monkeypatch.setattr(calibration, "online_cpus", lambda: 1)
    assert default_argon2_parallel() == 1


def test_wall_clock_sample_derives():
    seconds = wall_clock_sample("argon2id", 4, 64, 2)
    assert seconds is not None and seconds > 0
    # libargon2 refuses fewer than 8 blocks a lane: reported, not raised.
    assert wall_clock_sample("argon2i", 4, 8, 2) is None


def test_real_calibration_of_a_small_ceiling(monkeypatch):
    monkeypatch.setattr(calibration, "CEILING_SAMPLE_SECONDS", 0.01)
    calibration.clear_calibration()
    try:
        start = time.perf_counter()
        time_cost, memory = argon2_costs("argon2id", 20, 32, 1)
        assert time.perf_counter() - start < 5
        assert memory == 32 and time_cost > MIN_TIME_COST
        assert argon2_costs("argon2id", 40, 32, 1)[0] in range(2 * time_cost - 1,
                                                                  2 * time_cost + 2)
    finally:
        calibration.clear_calibration()


def test_calibration_runs_without_the_gil(monkeypatch):
    # Samples of 0.3 s: were the GIL held during one, this thread would stall
    # for as long.
    monkeypatch.setattr(calibration, "CEILING_SAMPLE_SECONDS", 0.3)
    calibrator = Calibrator()
    worker = threading.Thread(target=calibrator.rate, args=("argon2id", 32, 1))
    worker.start()
    longest = 0.0
    last = time.perf_counter()
    while worker.is_alive():
        time.sleep(0.001)
        now = time.perf_counter()
        longest = max(longest, now - last)
        last = now
    worker.join()
    assert calibrator.cached("argon2id", 32, 1) is not None
    assert longest < 0.15
