#!/usr/bin/env python3
"""The luks data path in-process against qemu-io, on the same image.

    .venv/bin/python tests/benchmarks/datapath.py [--size MiB] [--runs N]
        [--random-count N] [--tree PATH] [--keep DIR]

One aes-256-xts-plain64 LUKS image (qemu-img create -f luks, 256 MiB by
default, its payload filled with random bytes) is measured, in the same
run, by

  qemu     qemu-io (QEMU 7.2's block layer and crypto) running a script of
           the requests from stdin (``read -q OFF LEN``, ``write -q -P ...``,
           ``aio_read`` batches closed by ``aio_flush``); its time is the
           wall time minus that of the same qemu-io with an empty script
           (start, PBKDF2 open, close: the image is made with iter-time 10).
           qemu-img bench would be the natural tool, but 7.2's bench takes
           no --object, so it cannot open a LUKS image;
  qmpd     a LuksNode opened through a BlockGraph (blockdev.add), driven
           through the async Node API under trio: the same requests in the
           same order; the clock runs around the requests only.

Cases: sequential decrypt (1 MiB reads) and encrypt (1 MiB writes) of the
whole image; 4 KiB reads at offsets spread over the image (a stride of an
odd number of 4 KiB blocks, modulo the image size: every block once, in a
scattered order), one at a time (QD1) and in batches of 16 in flight
(qemu-io's aio_read x16 + aio_flush; qmpd: 16 reads in a nursery). Both
read and write through the page cache (qemu-io -t writeback; qmpd does
buffered I/O), so the numbers compare block layer and crypto, not the disk.
Each case runs ``--runs`` times alternating qemu and qmpd; the table shows
medians and the ratio qmpd/qemu (above 1: qmpd is faster).

``--tree PATH`` measures the qmpd of another checkout (e.g. a ``git
archive`` of an older commit) against the same qemu numbers, for
before/after tables. Nothing asserts a time: the numbers are for people.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PASSPHRASE = "bench-pass"
SECRET = f"secret,id=s0,data={PASSPHRASE}"
MiB = 1 << 20
BATCH = 16


def qemu_img(*args: str, retries: int = 30) -> str:
    """qemu-img, retried on QEMU 7.2's PBKDF2 calibration flake."""
    for _ in range(retries):
        proc = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
        if proc.returncode == 0:
            return proc.stdout
        if "Unable to get accurate CPU usage" not in proc.stderr:
            break
        time.sleep(0.2)
    raise SystemExit(f"qemu-img {' '.join(args)} failed: {proc.stderr}")


def make_image(path: str, size: int) -> None:
    qemu_img("create", "-q", "-f", "luks", "--object", SECRET, "-o",
             "key-secret=s0,iter-time=10,cipher-alg=aes-256,cipher-mode=xts,ivgen-alg=plain64",
             path, str(size))
    with open(path, "r+b") as f:          # the payload allocated, as after a first fill
        f.seek(0, os.SEEK_END)
        f.seek(f.tell() - size)
        chunk = os.urandom(MiB)
        for _ in range(size // MiB):
            f.write(chunk)


def _qemu_io(path: str, script: str) -> float:
    args = ["qemu-io", "-t", "writeback", "--object", SECRET, "--image-opts",
            f"driver=luks,key-secret=s0,file.filename={path}"]
    start = time.perf_counter()
    proc = subprocess.run(args, input=script.encode(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - start
    text = (proc.stdout + proc.stderr).decode(errors="replace")
    if proc.returncode != 0 or "failed" in text or "error" in text.lower():
        raise SystemExit(f"qemu-io failed: {text[-2000:]}")
    return elapsed


def requests(*, count: int, size: int, step: int, depth: int, write: bool,
             disk: int) -> list[list[int]]:
    """The offsets, grouped as they go in flight together."""
    offsets = [(i * step) % disk for i in range(count)]
    return [offsets[i:i + depth] for i in range(0, len(offsets), depth)]


def qemu_script(params: dict, disk: int) -> str:
    size, lines = params["size"], []
    for batch in requests(**params, disk=disk):
        if params["write"]:
            lines += [f"write -q -P 0x5a {off} {size}" for off in batch]
        elif len(batch) == 1 and params["depth"] == 1:
            lines.append(f"read -q {batch[0]} {size}")
        else:
            lines += [f"aio_read -q {off} {size}" for off in batch] + ["aio_flush"]
    return "\n".join(lines) + "\n"


def qemu_bench(path: str, params: dict, disk: int, baseline: float) -> float:
    """Seconds for the requests through qemu-io, its start-up and open taken off."""
    return max(1e-6, _qemu_io(path, qemu_script(params, disk)) - baseline)


def qmpd_bench(path: str, params: dict) -> float:
    """The same requests through a LuksNode's async API, each batch in flight together."""
    import trio

    from qmpd.block import blockdev
    from qmpd.block.graph import BlockGraph
    from qmpd.errors import QMPError

    class Secrets:
        def lookup(self, secret_id: str) -> bytearray:
            if secret_id != "s0":
                raise QMPError.generic(f"No secret with id '{secret_id}'")
            return bytearray(PASSPHRASE.encode())

    async def main() -> float:
        graph = BlockGraph(Secrets())
        try:
            await blockdev.add(graph, {"driver": "luks", "node-name": "l0", "key-secret": "s0",
                                       "file": {"driver": "file", "filename": path}})
            node = graph.find("l0")
            size = params["size"]
            payload = b"\x5a" * size
            batches = requests(**params, disk=node.length())
            start = time.perf_counter()
            for batch in batches:
                if len(batch) == 1:
                    if params["write"]:
                        await node.write(batch[0], payload)
                    else:
                        await node.read(batch[0], size)
                    continue
                async with trio.open_nursery() as nursery:
                    for offset in batch:
                        nursery.start_soon(node.read, offset, size)
            return time.perf_counter() - start
        finally:
            await graph.close_all()

    return trio.run(main)


def cases(image_size: int, random_count: int) -> list[tuple[str, dict, str]]:
    blocks = image_size // 4096
    stride = 40503 % blocks or 1
    while stride % 2 == 0 or (blocks % stride == 0 and stride > 1):
        stride += 1
    seq = {"count": image_size // MiB, "size": MiB, "step": MiB, "depth": 1}
    rnd = {"count": min(random_count, blocks), "size": 4096, "step": stride * 4096}
    return [
        ("sequential decrypt, 1 MiB reads", {**seq, "write": False}, "MiB/s"),
        ("sequential encrypt, 1 MiB writes", {**seq, "write": True}, "MiB/s"),
        ("4 KiB scattered reads, QD1", {**rnd, "depth": 1, "write": False}, "IOPS"),
        (f"4 KiB scattered reads, {BATCH} in flight", {**rnd, "depth": BATCH, "write": False},
         "IOPS"),
    ]


def rate(seconds: float, params: dict, unit: str) -> float:
    if unit == "MiB/s":
        return params["count"] * params["size"] / MiB / seconds
    return params["count"] / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="image size in MiB (256)")
    parser.add_argument("--runs", type=int, default=3, help="runs per case (median; 3)")
    parser.add_argument("--random-count", type=int, default=20000,
                        help="4 KiB requests per scattered-read run (20000)")
    parser.add_argument("--tree", default=str(REPO), help="the qmpd checkout to measure")
    parser.add_argument("--keep", help="a directory for the image (kept afterwards)")
    ns = parser.parse_args(argv)
    if shutil.which("qemu-img") is None:
        print("qemu-img is not installed", file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(ns.tree).resolve()))
    import qmpd  # noqa: F401  (from the tree asked for)

    workdir = ns.keep or tempfile.mkdtemp(prefix="datapath-bench-")
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "bench.luks")
    try:
        image_size = ns.size * MiB
        print(f"making a {ns.size} MiB aes-256-xts-plain64 image with qemu-img ...",
              file=sys.stderr)
        make_image(path, image_size)
        rows = []
        baseline = statistics.median(_qemu_io(path, "") for _ in range(5))
        for name, params, unit in cases(image_size, ns.random_count):
            qemu_rates, qmpd_rates = [], []
            for _ in range(ns.runs):
                qemu_rates.append(rate(qemu_bench(path, params, image_size, baseline),
                                       params, unit))
                qmpd_rates.append(rate(qmpd_bench(path, params), params, unit))
            q, m = statistics.median(qemu_rates), statistics.median(qmpd_rates)
            rows.append((name, unit, q, m))
            print(f"  {name}: qemu {q:.0f}, qmpd {m:.0f} {unit}", file=sys.stderr)
        tree = Path(ns.tree).resolve()
        head = subprocess.run(["git", "-C", str(tree), "log", "-1", "--format=%h %s"],
                              capture_output=True, text=True).stdout.strip() or str(tree)
        version = subprocess.run(["qemu-io", "--version"], capture_output=True,
                                 text=True).stdout.splitlines()[0]
        print(f"\nqmpd: {head}\nqemu: {version} (start-up and open, "
              f"{baseline * 1000:.0f} ms, taken off)\nimage {ns.size} MiB aes-256-xts-plain64, "
              f"page cache, medians of {ns.runs}\n")
        print(f"{'case':36} {'unit':>6} {'qemu':>9} {'qmpd':>9} {'qmpd/qemu':>10}")
        for name, unit, q, m in rows:
            print(f"{name:36} {unit:>6} {q:9.0f} {m:9.0f} {m / q:10.2f}")
    finally:
        if not ns.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
