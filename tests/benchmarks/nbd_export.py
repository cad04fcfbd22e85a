#!/usr/bin/env python3
"""qmpd's NBD export against qemu-storage-daemon 7.2's, same images, same run.

    python3 tests/benchmarks/nbd_export.py [--runs 3] [--quick]
    (also part of: python3 dev.py bench)

For raw LUKS (aes-256-xts-plain64) and qcow2 with LUKS inside, each daemon
exports the decrypted disk over a Unix socket and fio's nbd engine measures
sequential write and read throughput (1 MiB requests, queue depth 4) and
4 KiB random-read IOPS at queue depth 16. Then a fio 4 KiB random-read job
at queue depth 1 runs while the daemon adds a key (x-blockdev-amend,
iter-time 1000): its longest completion latency is how long a guest's I/O
stalled during the key update. Medians of --runs; ratios qmpd/qsd.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.benchmarks.run import PASSWORD, Daemon  # noqa: E402
from tests.oracles import qemu_img_create_luks  # noqa: E402

SIZE = "256M"


def fio(uri: str, rw: str, bs: str, iodepth: int, *, seconds: float | None = None,
        size: str = SIZE) -> dict:
    """One fio job over NBD; its JSON 'jobs[0]'."""
    args = ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}",
            f"--bs={bs}", f"--iodepth={iodepth}", f"--size={size}", "--output-format=json",
            "--randrepeat=1", "--norandommap"]
    if seconds is not None:
        args += ["--time_based", f"--runtime={seconds}"]
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"fio failed: {done.stderr.strip() or done.stdout[-500:]}")
    out = done.stdout
    return json.loads(out[out.index("{"):])["jobs"][0]


def wait_listening(path: str, timeout: float = 20) -> None:
    """Until a connect succeeds: the socket file exists from bind(), before listen()."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.socket(socket.AF_UNIX) as probe:
                probe.connect(path)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def blockdev_args(kind: str, image: str) -> list[str]:
    node = (f"driver=luks,node-name=n0,key-secret=s0,file.driver=file,file.filename={image}"
            if kind == "luks" else
            f"driver=qcow2,node-name=n0,encrypt.format=luks,encrypt.key-secret=s0,file.driver=file,"
            f"file.filename={image}")
    return ["--object", f"secret,id=s0,data={PASSWORD}", "--blockdev", node]


def measure(daemon_kind: str, image_kind: str, image: str, work: Path, iter_time: int,
            seconds: float) -> dict[str, float]:
    nbd_sock = str(work / f"{daemon_kind}-nbd.sock")
    extra = blockdev_args(image_kind, image) + [
        "--nbd-server", f"addr.type=unix,addr.path={nbd_sock}",
        "--export", "type=nbd,id=e0,node-name=n0,name=disk,writable=on"]
    d = Daemon(daemon_kind, work, 1, extra)
    uri = f"nbd+unix:///disk?socket={nbd_sock}"
    out: dict[str, float] = {}
    try:
        wait_listening(nbd_sock)
        w = fio(uri, "write", "1M", 4)
        out["sequential write, 1 MiB (MiB/s)"] = w["write"]["bw"] / 1024
        r = fio(uri, "read", "1M", 4)
        out["sequential read, 1 MiB (MiB/s)"] = r["read"]["bw"] / 1024
        rr = fio(uri, "randread", "4k", 16, seconds=seconds)
        out["4 KiB random read, QD16 (IOPS)"] = rr["read"]["iops"]
        out["longest I/O latency during add-key (ms)"] = latency_during_add_key(
            d, uri, image_kind, iter_time)
    finally:
        d.stop()
    return out


def latency_during_add_key(d: Daemon, uri: str, image_kind: str, iter_time: int) -> float:
    c = d.client(0)
    c.execute("object-add", {"qom-type": "secret", "id": "new", "data": "another"})
    result: dict = {}

    def reader() -> None:
        result["job"] = fio(uri, "randread", "4k", 1, seconds=iter_time / 1000 * 3 + 2)

    t = threading.Thread(target=reader)
    t.start()
    time.sleep(1.0)
    add = {"state": "active", "new-secret": "new", "iter-time": iter_time}
    options = ({"driver": "luks", **add} if image_kind == "luks" else
               {"driver": "qcow2", "encrypt": {"format": "luks", **add}})
    reply = c.execute("x-blockdev-amend", {"job-id": "add", "node-name": "n0",
                                           "options": options})
    assert "return" in reply, reply
    c.wait_job("add")
    t.join()
    c.close()
    return result["job"]["read"]["clat_ns"]["max"] / 1e6


def make_images(work: Path, run: int) -> dict[str, str]:
    images = {}
    for kind, fmt in (("luks", "luks"), ("qcow2", "qcow2")):
        path = str(work / f"{kind}-{run}.img")
        qemu_img_create_luks(path, PASSWORD, size=SIZE, iter_time=10, fmt=fmt)
        images[kind] = path
    return images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="shorter random-read runs")
    opts = parser.parse_args(argv)
    for tool in ("qemu-storage-daemon", "fio"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed")
    seconds = 3 if opts.quick else 8
    results: dict[tuple[str, str], dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="qmpd-nbd-bench-") as tmp:
        work = Path(tmp)
        for run in range(opts.runs):
            for daemon_kind in ("qsd", "qmpd"):
                images = make_images(work, run)
                for image_kind, image in images.items():
                    figures = measure(daemon_kind, image_kind, image, work, 1000, seconds)
                    for name, value in figures.items():
                        results.setdefault((image_kind, name), {}).setdefault(
                            daemon_kind, []).append(value)
                for image in images.values():
                    os.unlink(image)
    print(f"\nNBD export, qmpd vs qemu-storage-daemon 7.2 — medians of {opts.runs} runs, "
          f"{os.cpu_count()} cores, {SIZE} images\n")
    print("| image | measurement | qsd | qmpd | qmpd/qsd |")
    print("|---|---|---:|---:|---:|")
    for (image_kind, name), by in results.items():
        s, q = statistics.median(by["qsd"]), statistics.median(by["qmpd"])
        label = "raw LUKS" if image_kind == "luks" else "qcow2+LUKS"
        print(f"| {label} | {name} | {s:,.0f} | {q:,.0f} | {q / s:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
