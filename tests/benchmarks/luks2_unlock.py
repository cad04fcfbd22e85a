#!/usr/bin/env python3
"""qmpd's LUKS2 unlock against cryptsetup 2.6's, on the same images, in one run.

    .venv/bin/python tests/benchmarks/luks2_unlock.py [--runs 5] [--iter-time 2000] [--quick]

cryptsetup makes the images (aes-xts-plain64, 512-bit key) in this run:

* argon2id at cryptsetup's defaults, benchmarked by cryptsetup for
  --iter-time on this machine (memory 1 GiB at most half the RAM, lanes
  min(4, CPUs));
* argon2id at the costs qmpd's calibration (qmpd.crypto.argon2_calibration)
  picks for the same target, forced with --pbkdf-force-iterations: how
  long those costs take shows how well the calibration hits the target;
* pbkdf2-sha256, benchmarked by cryptsetup for --iter-time.

Each run then unlocks every image with (a) ``cryptsetup open
--test-passphrase`` (wall time of the process, its CPU time from
getrusage) and (b) qmpd: a daemon started once as a subprocess, timing
``blockdev-add`` of a luks node over a file node with a secret object (the
daemon's CPU time from /proc), and (c) while qmpd unlocks, another QMP
session sends query-version in a loop (1 ms apart) and the longest wait
is kept; that session polls during cryptsetup's unlock too, so both run
under the same load. The table has medians over --runs: qmpd/cryptsetup (goal: at
most 1.0x), as the ratio of the medians and as the median of each run's
ratio (a run's two unlocks are back to back, so they share its load);
CPU/wall of each (about the lanes, when they run in parallel on free
cores); the other session's longest wait (goal: at most 50 ms).

Nothing here asserts a time; the machine may be shared, and the load
average is printed before and after so that the reader can judge.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from qmpd.crypto.argon2_calibration import (  # noqa: E402
    argon2_costs,
    default_argon2_memory_kib,
    default_argon2_parallel,
)
from tests.processes import stop  # noqa: E402
from tests.qmp_client import QmpClient  # noqa: E402

PASSPHRASE = b"bench-pass"
TICK = os.sysconf("SC_CLK_TCK")


def cryptsetup(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(["cryptsetup", *args], input=input, capture_output=True)
    if done.returncode != 0:
        raise RuntimeError(f"cryptsetup {' '.join(args)}: {done.stderr.decode(errors='replace')}")
    return done


def make_image(path: Path, pbkdf_args: list[str]) -> dict:
    """A LUKS2 image with PASSPHRASE in keyslot 0; returns that slot's kdf."""
    with open(path, "wb") as f:
        f.truncate(32 << 20)
    cryptsetup("luksFormat", "--batch-mode", "--type", "luks2", "--cipher", "aes-xts-plain64",
               "--key-size", "512", "--key-file", "-", *pbkdf_args, str(path), input=PASSPHRASE)
    meta = json.loads(cryptsetup("luksDump", "--dump-json-metadata", str(path)).stdout)
    return meta["keyslots"]["0"]["kdf"]


def describe(kdf: dict) -> str:
    if kdf["type"] == "pbkdf2":
        return f"pbkdf2-{kdf['hash']} {kdf['iterations']:,} iterations"
    return f"{kdf['type']} time {kdf['time']}, memory {kdf['memory']} KiB, {kdf['cpus']} lanes"


def time_cryptsetup(path: Path) -> tuple[float, float]:
    """(wall s, CPU s) of ``cryptsetup open --test-passphrase``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    cryptsetup("open", "--test-passphrase", "--key-file", "-", str(path), input=PASSPHRASE)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


class Daemon:
    def __init__(self, workdir: Path) -> None:
        self.socket = str(workdir / "qmpd.sock")
        self.proc = subprocess.Popen([sys.executable, "-m", "qmpd", "--socket", self.socket],
                                     cwd=ROOT, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.client = self.session()
        self.client.ok("object-add", {"qom-type": "secret", "id": "pw",
                                      "data": PASSPHRASE.decode()})

    def session(self) -> QmpClient:
        return QmpClient(self.socket, timeout=120, connect_timeout=20, negotiate=True)

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK   # utime, stime

    def unlock(self, path: Path) -> tuple[float, float]:
        """(wall s, daemon CPU s) of blockdev-add of a luks node, then deleted."""
        cpu = self.cpu_seconds()
        start = time.perf_counter()
        self.client.ok("blockdev-add", {
            "driver": "luks", "node-name": "bench", "key-secret": "pw",
            "file": {"driver": "file", "node-name": "bench-file", "filename": str(path)}})
        wall = time.perf_counter() - start
        cpu = self.cpu_seconds() - cpu
        self.client.ok("blockdev-del", {"node-name": "bench"})     # and its file child
        return wall, cpu

    def stop(self) -> None:
        self.client.close()
        stop(self.proc)


class Poller:
    """Another session: query-version 1 ms apart; the longest wait (s)."""

    def __init__(self, daemon: Daemon) -> None:
        self.client = daemon.session()
        self.worst = 0.0
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            start = time.perf_counter()
            self.client.ok("query-version")
            self.worst = max(self.worst, time.perf_counter() - start)
            self.count += 1
            time.sleep(0.001)

    def __enter__(self) -> Poller:
        self._thread.start()
        time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.client.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--iter-time", type=int, default=2000, help="ms, as cryptsetup's")
    parser.add_argument("--quick", action="store_true", help="3 runs, iter-time 500")
    opts = parser.parse_args()
    if opts.quick:
        opts.runs, opts.iter_time = 3, 500
    if not shutil.which("cryptsetup"):
        sys.exit("cryptsetup is not installed (apt-get install cryptsetup-bin)")
    version = cryptsetup("--version").stdout.decode().split()[1]
    load_before = os.getloadavg()
    memory, lanes = default_argon2_memory_kib(), default_argon2_parallel()
    start = time.perf_counter()
    qmpd_costs = argon2_costs("argon2id", opts.iter_time, memory, lanes)
    calibration_s = time.perf_counter() - start

    rows: dict[str, dict[str, list[float]]] = {}

    def record(row: str, name: str, value: float) -> None:
        rows.setdefault(row, {}).setdefault(name, []).append(value)

    with tempfile.TemporaryDirectory(prefix="qmpd-luks2-bench-") as tmp:
        work = Path(tmp)
        images = {
            "argon2id, cryptsetup's costs": (work / "argon2id.luks", [
                "--pbkdf", "argon2id", "--iter-time", str(opts.iter_time)]),
            "argon2id, qmpd's calibrated costs": (work / "argon2id-qmpd.luks", [
                "--pbkdf", "argon2id", "--pbkdf-force-iterations", str(qmpd_costs[0]),
                "--pbkdf-memory", str(qmpd_costs[1]), "--pbkdf-parallel", str(lanes)]),
            "pbkdf2-sha256": (work / "pbkdf2.luks", [
                "--pbkdf", "pbkdf2", "--hash", "sha256", "--iter-time", str(opts.iter_time)]),
        }
        kdfs = {row: make_image(path, args) for row, (path, args) in images.items()}
        daemon = Daemon(work)
        try:
            for _ in range(opts.runs):
                for row, (path, _) in images.items():
                    # the other session polls during both unlocks: the same load
                    with Poller(daemon):
                        reference, cpu = time_cryptsetup(path)
                    record(row, "cryptsetup s", reference)
                    record(row, "cryptsetup cpu/wall", cpu / reference)
                    with Poller(daemon) as other:
                        wall, cpu = daemon.unlock(path)
                    record(row, "qmpd s", wall)
                    record(row, "qmpd cpu/wall", cpu / wall)
                    record(row, "paired ratio", wall / reference)
                    record(row, "other session's longest wait ms", other.worst * 1000)
        finally:
            daemon.stop()
    load_after = os.getloadavg()

    print(f"\nLUKS2 unlock, qmpd vs cryptsetup {version} -- medians of {opts.runs} runs, "
          f"{os.cpu_count()} CPUs, target {opts.iter_time} ms")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} "
          f"(a shared machine makes every figure noisy)\n")
    print(f"qmpd's calibration: argon2_costs('argon2id', {opts.iter_time}, {memory}, {lanes}) = "
          f"{qmpd_costs} in {calibration_s:.2f} s")
    for row, kdf in kdfs.items():
        print(f"  {row}: {describe(kdf)}")
    print()
    columns = ["cryptsetup s", "qmpd s", "qmpd/cryptsetup", "paired ratio", "cryptsetup cpu/wall",
               "qmpd cpu/wall", "other session's longest wait ms"]
    print("| image | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for row, values in rows.items():
        med = {name: statistics.median(v) for name, v in values.items()}
        med["qmpd/cryptsetup"] = med["qmpd s"] / med["cryptsetup s"]
        cells = [f"{med[name]:.3f}" if name.endswith(" s") else
                 f"{med[name]:.0f}" if name.endswith("ms") else f"{med[name]:.2f}"
                 for name in columns]
        print(f"| {row} | " + " | ".join(cells) + " |")
    print("\nevery run (s): " + "; ".join(
        f"{row}: cryptsetup {', '.join(f'{v:.2f}' for v in values['cryptsetup s'])} / "
        f"qmpd {', '.join(f'{v:.2f}' for v in values['qmpd s'])}" for row, values in rows.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
