#!/usr/bin/env python3
"""LUKS payload sector crypto throughput: per-sector contexts vs numpy paths.

    .venv/bin/python tests/benchmarks/sector_crypto.py [--total MiB] [--repeat N]
    .venv/bin/python tests/benchmarks/sector_crypto.py --crossover | --gil

For each cipher, request size and direction it prints MiB/s of
  old         SectorCipher before the vectorised paths, copied here: one
              `cryptography` context per sector (for XTS: OpenSSL's XTS);
  per-sector  today's per-sector path (the same contexts, less overhead):
              SectorCipher's choice for short requests,
  numpy       the vectorised path forced (XTS over ECB, CBC by columns),
  auto        SectorCipher.encrypt/decrypt as shipped (picks one of the two).
--crossover prints both for 1..64 sectors per request (the numbers behind
ciphers._PER_SECTOR_MAX); --gil shows whether a second thread keeps running
during a 64 MiB decrypt.  Nothing asserts a time: the numbers are for people.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cryptography.hazmat.primitives.ciphers import Cipher, modes  # noqa: E402

from qmpd.crypto import ciphers  # noqa: E402
from qmpd.crypto.ciphers import CipherSpec, SectorCipher  # noqa: E402

SPECS = {
    "aes-256-xts-plain64": (CipherSpec("aes-256", "xts", "plain64"), 64),
    "aes-256-cbc-essiv:sha256": (CipherSpec("aes-256", "cbc", "essiv", "sha256"), 32),
}


def old_style(cipher: SectorCipher, encrypt: bool):
    """SectorCipher before the numpy paths (commit d21b0f3), 512-byte IV units.

    Python-made IVs, then per sector a `cryptography` context, update() +
    finalize() into a bytearray, bytes() of it.
    """
    spec, size, shift = cipher.spec, cipher.sector_size, cipher._iv_shift
    algorithm, mode = cipher._algorithm, cipher.spec.cipher_mode

    def ivs(first, count):
        numbers = [((first + k) << shift) & (2**64 - 1) for k in range(count)]
        if spec.ivgen_alg == "plain64":
            return [n.to_bytes(8, "little") + bytes(8) for n in numbers]
        plain = b"".join(n.to_bytes(8, "little") + bytes(8) for n in numbers)
        encrypted = Cipher(cipher._essiv_algorithm, modes.ECB()).encryptor().update(plain)
        return [encrypted[i:i + 16] for i in range(0, len(encrypted), 16)]

    def run(sector, data):
        view = memoryview(data)
        out = bytearray(len(data))
        for index, iv in enumerate(ivs(sector, -(-len(data) // size))):
            start = index * size
            chunk = view[start:start + size]
            context = Cipher(algorithm, modes.XTS(iv) if mode == "xts" else modes.CBC(iv))
            context = context.encryptor() if encrypt else context.decryptor()
            out[start:start + len(chunk)] = context.update(chunk) + context.finalize()
        view.release()
        return bytes(out)

    return run


def paths(cipher: SectorCipher, encrypt: bool) -> dict:
    size = cipher.sector_size
    count = lambda data: -(-len(data) // size)   # noqa: E731

    def per_sector(sector, data):
        return cipher._per_sector(sector, count(data), data, encrypt)

    def vectorised(sector, data):
        with ciphers._scratch():
            return cipher._vectorised(sector, count(data), data, encrypt)

    auto = cipher.encrypt if encrypt else cipher.decrypt
    return {"old": old_style(cipher, encrypt), "per-sector": per_sector,
            "numpy": vectorised, "auto": auto}


def throughput(fn, request: int, total: int, sector_size: int, repeat: int = 3) -> float:
    data = os.urandom(request)
    per_request = request // sector_size
    requests = max(1, total // request)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for i in range(requests):
            fn(i * per_request, data)
        best = min(best, time.perf_counter() - start)
    return requests * request / best / (1 << 20)


def table(total: int, sector_sizes: list[int], repeat: int) -> None:
    print(f"{'cipher':26} {'sector':>6} {'request':>8} {'dir':4} {'old':>6} "
          f"{'per-sector':>11} {'numpy':>9} {'auto':>9}   MiB/s")
    for name, (spec, nkey) in SPECS.items():
        for sector_size in sector_sizes:
            cipher = SectorCipher(spec, os.urandom(nkey), sector_size=sector_size,
                                  iv_shift=(sector_size // 512).bit_length() - 1)
            for request in (4096, 1 << 20):
                for encrypt in (True, False):
                    rates = {label: throughput(fn, request, total, sector_size, repeat)
                             for label, fn in paths(cipher, encrypt).items()}
                    print(f"{name:26} {sector_size:6} {request // 1024:6}Ki "
                          f"{'enc' if encrypt else 'dec':4} {rates['old']:6.0f} "
                          f"{rates['per-sector']:11.0f} "
                          f"{rates['numpy']:9.0f} {rates['auto']:9.0f}", flush=True)


def crossover(sector_sizes: list[int]) -> None:
    """Per-sector vs numpy MiB/s for small requests, and where numpy wins."""
    counts = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
    for name, (spec, nkey) in SPECS.items():
        for sector_size in sector_sizes:
            cipher = SectorCipher(spec, os.urandom(nkey), sector_size=sector_size)
            for encrypt in (True, False):
                fns = paths(cipher, encrypt)
                cells, wins = [], None
                for sectors in counts:
                    request = sectors * sector_size
                    total = max(request * 200, 4 << 20)
                    per_sector = throughput(fns["per-sector"], request, total, sector_size)
                    vectorised = throughput(fns["numpy"], request, total, sector_size)
                    if wins is None and vectorised > per_sector:
                        wins = sectors
                    cells.append(f"{sectors}:{per_sector:.0f}/{vectorised:.0f}")
                print(f"{name} {sector_size} {'enc' if encrypt else 'dec'}: numpy wins "
                      f"from {wins} sectors; per-sector/numpy MiB/s " + " ".join(cells),
                      flush=True)


def gil() -> None:
    """A pure-Python loop in a second thread during a 64 MiB decrypt.

    Shows that the decrypt lets the loop run (numpy and `cryptography`
    release the GIL on big buffers), and what the loop costs the decrypt:
    each release can leave the decrypt waiting a switch interval for the GIL.
    """
    cipher = SectorCipher(SPECS["aes-256-xts-plain64"][0], os.urandom(64))
    data = os.urandom(64 << 20)
    cipher.decrypt(0, data)   # warm up
    start = time.perf_counter()
    cipher.decrypt(0, data)
    alone = time.perf_counter() - start
    counted = [0]
    stop = threading.Event()

    def count():
        n = 0
        while not stop.is_set():
            n += 1
            if not n & 1023:
                counted[0] = n

    def rate(fn):
        before = counted[0]
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        return elapsed, (counted[0] - before) / elapsed

    thread = threading.Thread(target=count)
    thread.start()
    try:
        _, idle_rate = rate(lambda: time.sleep(0.3))
        busy, busy_rate = rate(lambda: cipher.decrypt(0, data))
    finally:
        stop.set()
        thread.join()
    print(f"second thread: {idle_rate:,.0f} loops/s while the main thread sleeps, "
          f"{busy_rate:,.0f} loops/s ({100 * busy_rate / idle_rate:.0f}%) during a "
          f"64 MiB decrypt; the decrypt took {busy * 1e3:.0f} ms with it, "
          f"{alone * 1e3:.0f} ms alone")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--total", type=int, default=256, help="MiB per measurement")
    parser.add_argument("--sector-sizes", default="512,4096")
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs")
    parser.add_argument("--crossover", action="store_true")
    parser.add_argument("--gil", action="store_true")
    args = parser.parse_args()
    sector_sizes = [int(s) for s in args.sector_sizes.split(",")]
    if args.crossover:
        crossover(sector_sizes)
    elif args.gil:
        gil()
    else:
        table(args.total << 20, sector_sizes, args.repeat)


if __name__ == "__main__":
    main()
