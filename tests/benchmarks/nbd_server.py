#!/usr/bin/env python3
"""NbdServer against qemu-storage-daemon 7.2's NBD server, measured with fio.

    .venv/bin/python tests/benchmarks/nbd_server.py [--runtime 5] [--size 256]

Both serve a disk of --size MiB over a unix socket: ours from memory (a
bytearray behind the NbdExport interface: the protocol and edge cost, not a
block layer's), qsd from a fully written file on /dev/shm. fio's nbd engine
(libnbd, structured replies) runs 4 KiB random reads at queue depth 16 and
1 MiB sequential reads and writes on each; the table shows IOPS, MiB/s and
the ratio ours/qsd. Nothing asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.nbd.serve import ServedCatalog
from tests.processes import accepts, stop

MiB = 1 << 20


@dataclass(frozen=True)
class _Run:
    length: int
    data: bool = True
    zero: bool = False
    allocated: bool = True


@dataclass(eq=False)
class FastExport:
    """All data, all allocated: block status is one extent, reads one slice."""

    name: str
    size: int
    writable: bool = True
    description: str | None = None
    min_block: int = 1
    allocation_depth: bool = False
    data: bytearray = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.data = bytearray(os.urandom(self.size))

    async def read(self, offset, length):
        return self.data[offset:offset + length]

    def read_now(self, ranges):
        return [self.data[offset:offset + length] for offset, length in ranges]

    def block_status_now(self, offset, length):
        return [_Run(length)]

    async def write(self, offset, data, fua):
        self.data[offset:offset + len(data)] = data

    async def write_zeroes(self, offset, length, *, may_unmap, fua, fast):
        self.data[offset:offset + length] = bytes(length)

    async def trim(self, offset, length):
        pass

    async def flush(self):
        pass

    async def cache(self, offset, length):
        pass

    async def block_status(self, offset, length):
        return [_Run(length)]


class _Catalog:
    def __init__(self, export):
        self.export = export

    def lookup(self, name):
        return self.export if name == self.export.name else None

    def list_exports(self):
        return [self.export]


JOBS = {
    "4k randread QD16": ["--rw=randread", "--bs=4k", "--iodepth=16"],
    "1M seq read QD4": ["--rw=read", "--bs=1M", "--iodepth=4"],
    "1M seq write QD4": ["--rw=write", "--bs=1M", "--iodepth=4"],
}


def fio(uri: str, args: list[str], runtime: float, size_mib: int) -> dict:
    proc = subprocess.run(
        ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--size={size_mib}M",
         f"--runtime={runtime}", "--time_based", "--output-format=json", *args],
        capture_output=True, check=True)
    job = json.loads(proc.stdout[proc.stdout.index(b"{"):])["jobs"][0]
    side = job["write"] if "write" in args[0] else job["read"]
    return {"iops": side["iops"], "mib_s": side["bw_bytes"] / MiB,
            "ios": side["total_ios"]}


def start_qsd(image: Path, sock: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        ["qemu-storage-daemon", "--blockdev",
         f"driver=file,node-name=f0,filename={image},cache.direct=off",
         "--nbd-server", f"addr.type=unix,addr.path={sock}",
         "--export", "type=nbd,id=e0,node-name=f0,name=disk,writable=on"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while not accepts(str(sock)):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(proc.stderr.read().decode())
        time.sleep(0.02)
    return proc


def cpu_seconds(pid: int | None) -> float:
    """CPU time of qsd (from /proc) or of this process (our server's thread)."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(uri: str, pid: int | None, fio_args: list[str], args) -> dict:
    before = cpu_seconds(pid)
    result = fio(uri, fio_args, args.runtime, args.size)
    result["cpu_us_per_io"] = (cpu_seconds(pid) - before) / max(result["ios"], 1) * 1e6
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", type=float, default=5)
    parser.add_argument("--runs", type=int, default=3, help="alternating runs per job")
    parser.add_argument("--size", type=int, default=256, help="disk size in MiB")
    args = parser.parse_args()
    samples: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="nbd-bench-") as tmp, \
            tempfile.TemporaryDirectory(prefix="nbd-bench-", dir="/dev/shm") as shm:
        image = Path(shm) / "disk.raw"
        with open(image, "wb") as f:
            f.writelines(os.urandom(MiB) for _ in range(args.size))
        qsd_sock = Path(tmp) / "qsd.sock"
        proc = start_qsd(image, qsd_sock)
        ours = ServedCatalog(_Catalog(FastExport("disk", args.size * MiB)),
                             unix=str(Path(tmp) / "ours.sock"))
        targets = {"qmpd": (ours.uri("disk"), None),
                   "qsd": (f"nbd+unix:///disk?socket={qsd_sock}", proc.pid)}
        try:
            with ours:
                for job, fio_args in JOBS.items():
                    for _ in range(args.runs):  # alternate, so load spikes hit both
                        for name, (uri, pid) in targets.items():
                            samples.setdefault((name, job), []).append(
                                measure(uri, pid, fio_args, args))
        finally:
            stop(proc)

    def median(name, job, key):
        return statistics.median(r[key] for r in samples[name, job])

    print(f"medians of {args.runs} alternating {args.runtime:g} s runs; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'job':<18}{'qmpd':>16}{'qsd 7.2':>16}{'ratio':>7}{'CPU us/io qmpd':>16}{'qsd':>6}")
    for job in JOBS:
        key, unit = ("iops", "IOPS") if "4k" in job else ("mib_s", "MiB/s")
        a, b = median("qmpd", job, key), median("qsd", job, key)
        print(f"{job:<18}{a:>10.0f} {unit:<5}{b:>10.0f} {unit:<5}{a / b:>7.2f}"
              f"{median('qmpd', job, 'cpu_us_per_io'):>16.1f}"
              f"{median('qsd', job, 'cpu_us_per_io'):>6.1f}")


if __name__ == "__main__":
    main()
