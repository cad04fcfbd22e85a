#!/usr/bin/env python3
"""qmpd against qemu-storage-daemon 7.2, side by side in one run.

    python3 dev.py bench [--runs 3] [--quick]

Starts both daemons on the same machine, measures the same things on each,
prints a table of medians over --runs repetitions and the ratio qmpd/qsd.
LUKS images are made by qemu-img (aes-256-xts; sha256 unless a row names
sha1 or sha512). The iteration rows add a key in a daemon that has not
calibrated yet: once with one other session polling, once in a fresh daemon
while 4 other sessions send commands back to back; the spread of those
counts across runs follows the table.
Nothing here asserts a time: the numbers are for people (README has the
table of the last run we recorded).
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

from tests.oracles import qemu_img_create_luks, run_qemu_img  # noqa: E402

PASSWORD = "bench-pass"


class Client:
    """A minimal blocking QMP client that measures round trips."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.buf = b""
        self.read_message()  # greeting

    def read_message(self) -> dict:
        while b"\n" not in self.buf:
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("daemon closed the connection")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, command: str, arguments: dict | None = None) -> dict:
        message = {"execute": command}
        if arguments is not None:
            message["arguments"] = arguments
        self.sock.sendall(json.dumps(message).encode())
        while True:
            reply = self.read_message()
            if "event" not in reply:
                return reply

    def wait_job(self, job_id: str) -> None:
        while True:
            msg = self.read_message()
            if msg.get("event") == "JOB_STATUS_CHANGE" and msg["data"] == {"id": job_id, "status": "concluded"}:
                return

    def close(self) -> None:
        self.sock.close()


class Daemon:
    def __init__(self, kind: str, workdir: Path, monitors: int, extra: list[str]) -> None:
        self.kind = kind
        self.sockets = [str(workdir / f"{kind}-{i}.sock") for i in range(monitors)]
        if kind == "qsd":
            args = ["qemu-storage-daemon"]
            for i, path in enumerate(self.sockets):
                args += ["--chardev", f"socket,id=c{i},path={path},server=on,wait=off",
                         "--monitor", f"chardev=c{i}"]
        else:
            args = [sys.executable, "-m", "qmpd"]
            for path in self.sockets:
                args += ["--socket", path]
        self.proc = subprocess.Popen(args + extra, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not all(os.path.exists(s) for s in self.sockets):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.proc.kill()
                raise RuntimeError(f"{kind} did not start")
            time.sleep(0.02)

    def client(self, index: int = 0) -> Client:
        c = Client(self.sockets[index % len(self.sockets)])
        assert "return" in c.execute("qmp_capabilities")
        return c

    def rss_kib(self) -> int:
        for line in open(f"/proc/{self.proc.pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# -- measurements: each returns a number (higher or lower is better, see table) --

def sequential_rate(d: Daemon, n: int) -> float:
    c = d.client()
    t0 = time.perf_counter()
    for _ in range(n):
        c.execute("query-version")
    rate = n / (time.perf_counter() - t0)
    c.close()
    return rate


def pipelined_rate(d: Daemon, n: int) -> float:
    c = d.client()
    payload = b'{"execute": "query-version"}' * n
    t0 = time.perf_counter()
    sender = threading.Thread(target=c.sock.sendall, args=(payload,))
    sender.start()
    for _ in range(n):
        c.read_message()
    rate = n / (time.perf_counter() - t0)
    sender.join()
    c.close()
    return rate


def concurrent_rate(d: Daemon, n_clients: int, per_client: int) -> float:
    clients = [d.client(i) for i in range(n_clients)]
    barrier = threading.Barrier(n_clients + 1)

    def work(c: Client) -> None:
        barrier.wait()
        for _ in range(per_client):
            c.execute("query-version")

    threads = [threading.Thread(target=work, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    rate = n_clients * per_client / (time.perf_counter() - t0)
    for c in clients:
        c.close()
    return rate


def add_slots_with_qemu_img(image: str, count: int, iter_time: int) -> str:
    """Fill slots 1..count with other passphrases; the last one is returned."""
    for n in range(1, count + 1):
        run_qemu_img(["amend", "--object", f"secret,id=s0,data={PASSWORD}",
                      "--object", f"secret,id=s1,data={PASSWORD}-{n}",
                      "--image-opts", f"driver=luks,key-secret=s0,file.filename={image}",
                      "-o", f"state=active,new-secret=s1,iter-time={iter_time}"])
    return f"{PASSWORD}-{count}"


def open_luks(c: Client, image: str, node: str = "l0", passphrase: str = PASSWORD) -> float:
    c.execute("object-add", {"qom-type": "secret", "id": f"pw-{node}", "data": passphrase})
    t0 = time.perf_counter()
    reply = c.execute("blockdev-add", {"driver": "luks", "node-name": node, "key-secret": f"pw-{node}",
                                       "file": {"driver": "file", "filename": image}})
    elapsed = time.perf_counter() - t0
    assert "return" in reply, reply
    return elapsed


class Poller:
    """Another session: query-version every 2 ms, remembering the longest wait (s).

    ``pause=False`` hammers instead: back-to-back commands, as fast as the
    daemon answers.
    """

    def __init__(self, d: Daemon, index: int, pause: bool = True) -> None:
        self.client = d.client(index)
        self.pause = pause
        self.worst = 0.0
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll)

    def _poll(self) -> None:
        while not self._stop.is_set():
            t = time.perf_counter()
            self.client.execute("query-version")
            self.worst = max(self.worst, time.perf_counter() - t)
            self.count += 1
            if self.pause:
                time.sleep(0.002)

    def __enter__(self) -> "Poller":
        self._thread.start()
        time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.client.close()


def add_key(c: Client, iter_time: int) -> float:
    """Add a key to node l0 (iter-time ms); the job's wall time."""
    c.execute("object-add", {"qom-type": "secret", "id": "new", "data": "another"})
    t0 = time.perf_counter()
    reply = c.execute("x-blockdev-amend", {"job-id": "add", "node-name": "l0", "options": {
        "driver": "luks", "state": "active", "new-secret": "new", "iter-time": iter_time}})
    assert "return" in reply, reply
    c.wait_job("add")
    return time.perf_counter() - t0


def new_slot_iterations(c: Client) -> int:
    jobs = c.execute("query-jobs")["return"]
    assert not any(j.get("error") for j in jobs), jobs
    nodes = c.execute("query-named-block-nodes")["return"]
    slots = next(n for n in nodes if n["node-name"] == "l0")["image"]["format-specific"]["data"]["slots"]
    return slots[1].get("iters", 0)


def add_key_with_latency(d: Daemon, image: str, iter_time: int) -> tuple[float, float, int]:
    """Add a key (iter-time ms); meanwhile another session polls query-version.

    Returns (job wall time s, longest wait of the other session s, new slot's iterations).
    """
    c = d.client(0)
    open_luks(c, image)
    with Poller(d, 1) as other:
        wall = add_key(c, iter_time)
    iters = new_slot_iterations(c)
    c.close()
    return wall, other.worst, iters


def add_key_hammered(d: Daemon, image: str, iter_time: int, sessions: int) -> int:
    """A fresh daemon calibrates while ``sessions`` other sessions hammer it:
    open, add a key; returns the new slot's iterations."""
    c = d.client(0)
    hammers = [Poller(d, 1 + i, pause=False) for i in range(sessions)]
    for h in hammers:
        h.__enter__()
    try:
        open_luks(c, image)
        add_key(c, iter_time)
    finally:
        for h in hammers:
            h.__exit__()
    iters = new_slot_iterations(c)
    c.close()
    return iters


def memory_with_nodes(d: Daemon, image_dir: Path, nodes: int, sessions: int) -> int:
    c = d.client(0)
    c.execute("object-add", {"qom-type": "secret", "id": "pw", "data": PASSWORD})
    for i in range(nodes):
        path = image_dir / f"raw{i}.img"
        if not path.exists():
            path.write_bytes(b"\0" * 65536)
        reply = c.execute("blockdev-add", {"driver": "file", "node-name": f"f{i}", "filename": str(path)})
        assert "return" in reply, reply
    extra = [d.client(0) for _ in range(sessions)] if d.kind == "qmpd" else []
    time.sleep(0.3)
    rss = d.rss_kib()
    for x in extra:
        x.close()
    c.close()
    return rss


HAMMER_SESSIONS = 4
#: Rows whose spread across runs is printed after the table (calibration stability).
SPREAD_ROWS = ("new slot's PBKDF2 iterations", f"new slot's PBKDF2 iterations, {HAMMER_SESSIONS} sessions hammering")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="fewer round trips, iter-time 200")
    opts = parser.parse_args()
    if not shutil.which("qemu-storage-daemon"):
        sys.exit("qemu-storage-daemon is not installed (apt-get install qemu-system-common)")
    n = 2000 if opts.quick else 10000
    iter_time = 200 if opts.quick else 1000
    results: dict[str, dict[str, list[float]]] = {"qsd": {}, "qmpd": {}}

    def record(kind: str, name: str, value: float) -> None:
        results[kind].setdefault(name, []).append(value)

    with tempfile.TemporaryDirectory(prefix="qmpd-bench-") as tmp:
        work = Path(tmp)
        multi = str(work / "four-slots.luks")
        qemu_img_create_luks(multi, PASSWORD, size="16M", iter_time=iter_time // 2)
        last = add_slots_with_qemu_img(multi, 3, iter_time // 2)
        # Opened only, never changed: made once. aes-256-xts, like the sha256 image.
        other_hashes = {}
        for hash_alg in ("sha1", "sha512"):
            other_hashes[hash_alg] = str(work / f"{hash_alg}.luks")
            qemu_img_create_luks(other_hashes[hash_alg], PASSWORD, size="16M", iter_time=iter_time,
                                 extra=f"hash-alg={hash_alg}")
        for run in range(opts.runs):
            for kind in ("qsd", "qmpd"):
                image = str(work / f"{kind}-{run}.luks")
                qemu_img_create_luks(image, PASSWORD, size="16M", iter_time=iter_time)
                d = Daemon(kind, work, 4, [])
                try:
                    record(kind, "idle RSS (MiB)", d.rss_kib() / 1024)
                    record(kind, "query-version, sequential (/s)", sequential_rate(d, n))
                    record(kind, "query-version, pipelined (/s)", pipelined_rate(d, n))
                    if kind == "qmpd":
                        record(kind, "query-version, 64 connections (/s)", concurrent_rate(d, 64, n // 64))
                    c = d.client(2)
                    with Poller(d, 3) as other:
                        record(kind, "blockdev-add of a qemu-img image (s)", open_luks(c, image, "probe"))
                        c.execute("blockdev-del", {"node-name": "probe"})
                        record(kind, "blockdev-add, 4 slots, passphrase in the last (s)",
                               open_luks(c, multi, "multi", last))
                        c.execute("blockdev-del", {"node-name": "multi"})
                        for hash_alg, path in other_hashes.items():
                            record(kind, f"blockdev-add of a qemu-img image, {hash_alg} (s)",
                                   open_luks(c, path, hash_alg))
                            c.execute("blockdev-del", {"node-name": hash_alg})
                    record(kind, "longest wait of another session during the blockdev-adds (ms)",
                           other.worst * 1000)
                    c.close()
                    wall, worst, iters = add_key_with_latency(d, image, iter_time)
                    record(kind, f"add-key job, iter-time {iter_time} (s)", wall)
                    record(kind, "longest wait of another session (ms)", worst * 1000)
                    record(kind, "new slot's PBKDF2 iterations", iters)
                finally:
                    d.stop()
                # A fresh daemon, so that it calibrates while other sessions hammer it.
                image = str(work / f"{kind}-{run}-hammered.luks")
                qemu_img_create_luks(image, PASSWORD, size="16M", iter_time=iter_time)
                d = Daemon(kind, work, 1 + HAMMER_SESSIONS, [])
                try:
                    record(kind, f"new slot's PBKDF2 iterations, {HAMMER_SESSIONS} sessions hammering",
                           add_key_hammered(d, image, iter_time, HAMMER_SESSIONS))
                finally:
                    d.stop()
                d = Daemon(kind, work, 1, [])
                try:
                    record(kind, "RSS with 100 nodes (+256 sessions for qmpd) (MiB)",
                           memory_with_nodes(d, work, 100, 256) / 1024)
                finally:
                    d.stop()
    print(f"\nqmpd vs qemu-storage-daemon 7.2 — medians of {opts.runs} runs, {os.cpu_count()} cores\n")
    print(f"| measurement | qsd | qmpd | qmpd/qsd |")
    print(f"|---|---:|---:|---:|")
    for name in results["qmpd"]:
        q = statistics.median(results["qmpd"][name])
        s = statistics.median(results["qsd"][name]) if name in results["qsd"] else None
        ratio = f"{q / s:.2f}" if s else "—"
        fmt = (lambda v: f"{v:,.0f}") if (q > 100 or (s or 0) > 100) else (lambda v: f"{v:.3f}")
        print(f"| {name} | {fmt(s) if s is not None else '—'} | {fmt(q)} | {ratio} |")
    print(f"\nSpread across the {opts.runs} runs (calibration stability):\n")
    print("| measurement | daemon | runs | max/min |")
    print("|---|---|---|---:|")
    for name in SPREAD_ROWS:
        for kind in ("qsd", "qmpd"):
            values = results[kind].get(name, [])
            if values:
                runs = ", ".join(f"{v:,.0f}" for v in values)
                print(f"| {name} | {kind} | {runs} | {max(values) / max(1, min(values)):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
