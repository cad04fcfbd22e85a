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
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.nbd.serve import ServedCatalog  # noqa: E402
from tests.processes import accepts, stop  # noqa: E402

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
         f"--runtime={runtime}", "--time_based", "--ramp_time=1", "--output-format=json",
         *args], capture_output=True, check=True)
    job = json.loads(proc.stdout[proc.stdout.index(b"{"):])["jobs"][0]
    side = job["write"] if "write" in args[0] else job["read"]
    return {"iops": side["iops"], "mib_s": side["bw_bytes"] / MiB}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", type=float, default=5)
    parser.add_argument("--size", type=int, default=256, help="disk size in MiB")
    args = parser.parse_args()
    results: dict[str, dict[str, dict]] = {"qmpd": {}, "qsd": {}}
    with tempfile.TemporaryDirectory(prefix="nbd-bench-") as tmp, \
            tempfile.TemporaryDirectory(prefix="nbd-bench-", dir="/dev/shm") as shm:
        sock = Path(tmp) / "ours.sock"
        with ServedCatalog(_Catalog(FastExport("disk", args.size * MiB)), unix=str(sock)) as s:
            for job, fio_args in JOBS.items():
                results["qmpd"][job] = fio(s.uri("disk"), fio_args, args.runtime, args.size)
        image = Path(shm) / "disk.raw"
        with open(image, "wb") as f:
            for _ in range(args.size):
                f.write(os.urandom(MiB))
        qsd_sock = Path(tmp) / "qsd.sock"
        proc = start_qsd(image, qsd_sock)
        try:
            for job, fio_args in JOBS.items():
                results["qsd"][job] = fio(f"nbd+unix:///disk?socket={qsd_sock}", fio_args,
                                          args.runtime, args.size)
        finally:
            stop(proc)
    print(f"{'job':<20}{'qmpd':>22}{'qsd 7.2':>22}{'qmpd/qsd':>10}")
    for job in JOBS:
        ours, theirs = results["qmpd"][job], results["qsd"][job]
        key = "iops" if "4k" in job else "mib_s"
        unit = "IOPS" if key == "iops" else "MiB/s"
        print(f"{job:<20}{ours[key]:>16.0f} {unit:<5}{theirs[key]:>16.0f} {unit:<5}"
              f"{ours[key] / theirs[key]:>10.2f}")


if __name__ == "__main__":
    main()
