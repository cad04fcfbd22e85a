"""Qcow2Clusters against QEMU 7.2: what one writes, the other reads.

qemu-io and qemu-img are the oracles, with and without LUKS inside the
qcow2 (the payload IV is the host sector: QEMU commit 4652b8f3).
"""

from __future__ import annotations

import errno
import json
import random
import subprocess

import pytest

from tests.block.drivers.test_qcow2_clusters import (
    MiB, image_args, make_image, open_image, qemu_check, qemu_raw, volume_cipher)
from tests.oracles import require

pytestmark = pytest.mark.interop

K64 = 65536


def qemu_io(path, encrypted, *commands: str) -> str:
    require("qemu-io")
    args = ["qemu-io"] + image_args(path, encrypted)[:-1]
    for command in commands:
        args += ["-c", command]
    proc = subprocess.run(args + [image_args(path, encrypted)[-1]], capture_output=True, text=True)
    assert proc.returncode == 0 and "Pattern verification failed" not in proc.stdout, \
        proc.stdout + proc.stderr
    return proc.stdout


def qemu_map(path, encrypted) -> list[dict]:
    out = subprocess.run(["qemu-img", "map", "--output=json"] + image_args(path, encrypted),
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


CASES = [("v3", False), ("v2", False), ("v3", True), ("v2", True)]


@pytest.mark.parametrize("version,encrypted", CASES)
def test_qemu_writes_read_by_qmpd(tmp_path, version, encrypted):
    path = make_image(tmp_path / "a.qcow2", 2 * MiB, K64, version, encrypted=encrypted)
    qemu_io(path, encrypted,
            "write -P 0x5a 0 64k",            # the IV check of the brief
            "write -P 0x33 100k 7k",           # partial cluster: COW in QEMU
            "write -P 0x77 192k 128k",
            "write -z 192k 64k",               # v3: zero flag, allocation kept
            "write -z -u 256k 64k",            # v3: zero flag, unmapped
            "write -c -P 0x44 384k 64k",       # compressed (stored unencrypted)
            "write -c -P 0x45 448k 64k",
            "write -P 0x66 512k 128k",
            "discard 576k 64k",
            "write -P 0x11 1m 64k", "write -P 0x12 1088k 64k", "discard 1m 64k")
    cipher = volume_cipher(path) if encrypted else None
    disk, node = open_image(path, read_only=True, crypto=cipher)
    expected = qemu_raw(path, encrypted)
    assert disk.pread(0, len(expected)) == expected
    assert disk.pread(0, 512) == b"\x5a" * 512
    assert disk.pread(384 * 1024, K64) == b"\x44" * K64
    # block status: QEMU's map (present = allocated here, zero, data)
    ours = []
    pos = 0
    for e in disk.block_status(0, disk.length()):
        ours.append((pos, e.length, e.allocated, e.zero, e.data))
        pos += e.length
    theirs = [(m["start"], m["length"], m["present"], m["zero"], m["data"])
              for m in qemu_map(path, encrypted)]
    assert _merged(ours) == _merged(theirs)
    node.close()


def _merged(runs):
    out = []
    for start, length, *status in runs:
        if out and out[-1][2:] == tuple(status):
            out[-1] = (out[-1][0], out[-1][1] + length, *status)
        else:
            out.append((start, length, *status))
    return out


@pytest.mark.parametrize("version,encrypted", CASES)
@pytest.mark.parametrize("cluster_size", [512, K64])
def test_qmpd_writes_read_by_qemu(tmp_path, version, encrypted, cluster_size):
    path = make_image(tmp_path / "a.qcow2", 2 * MiB, cluster_size, version, encrypted=encrypted)
    cipher = volume_cipher(path) if encrypted else None
    disk, node = open_image(path, crypto=cipher)
    align = 512 if encrypted else 1
    writes = [(0, 64 * 1024, 0x5A), (100 * 1024 + align * 3, 7 * 1024, 0x33),
              (300 * 1024, 200 * 1024, 0x77), (1 * MiB - 512, 1024, 0x19)]
    for offset, length, pattern in writes:
        disk.pwrite(offset, bytes([pattern]) * length)
    disk.pwrite_zeroes(320 * 1024, 64 * 1024)
    disk.pwrite_zeroes(400 * 1024, 64 * 1024, may_unmap=True)
    disk.pdiscard(0, 32 * 1024)
    expected = disk.pread(0, disk.length())
    disk.close()
    node.close()
    qemu_check(path, encrypted)
    assert qemu_raw(path, encrypted) == expected
    commands = [f"read -P 0x{p:x} {o} {n}" for o, n, p in (writes[1], writes[3])]
    qemu_io(path, encrypted, *commands, "read -P 0x77 300k 20k", "read -P 0 320k 64k", "read -P 0x77 384k 16k",
            "read -P 0 400k 64k", "read -P 0x77 464k 36k")
    # and QEMU can go on writing where we left off
    qemu_io(path, encrypted, "write -P 0x42 1000k 100k")
    qemu_check(path, encrypted)


@pytest.mark.parametrize("encrypted", [False, True])
def test_rewrite_compressed_cluster(tmp_path, encrypted):
    path = make_image(tmp_path / "a.qcow2", MiB, K64, "v3", encrypted=encrypted)
    qemu_io(path, encrypted, "write -c -P 0x44 0 64k", "write -c -P 0x45 64k 64k")
    cipher = volume_cipher(path) if encrypted else None
    disk, node = open_image(path, crypto=cipher)
    disk.pwrite(512, b"\x01" * 1024)                  # COW from the decompressed cluster
    disk.pwrite_zeroes(K64, K64)                      # a compressed cluster is unmapped
    assert disk._entry(1) == 1
    disk.close()
    node.close()
    report = qemu_check(path, encrypted)
    assert report.get("leaks", 0) == 0               # old compressed clusters were freed
    qemu_io(path, encrypted, "read -P 0x44 0 512", "read -P 0x01 512 1024",
            "read -P 0x44 1536 64000", "read -P 0 64k 64k")


def test_snapshot_clusters_are_copied_on_write(tmp_path):
    path = make_image(tmp_path / "a.qcow2", MiB, 4096, "v3")
    qemu_io(path, False, "write -P 0x11 0 256k", "write -c -P 0x22 256k 64k")
    subprocess.run(["qemu-img", "snapshot", "-c", "s1", path], check=True)
    disk, node = open_image(path)
    disk.pwrite(1000, b"\x99" * 5000)                 # shared L2 table and clusters: COW
    disk.pwrite_zeroes(64 * 1024, 64 * 1024, may_unmap=True)
    disk.pdiscard(128 * 1024, 8192)
    disk.pwrite(256 * 1024 + 100, b"\x98" * 100)
    expected = disk.pread(0, MiB)
    disk.close()
    node.close()
    qemu_check(path)
    assert qemu_raw(path) == expected
    subprocess.run(["qemu-img", "convert", "-l", "snapshot.name=s1", "-O", "raw", path,
                    str(tmp_path / "s1.raw")], check=True)
    snap = (tmp_path / "s1.raw").read_bytes()
    assert snap[:256 * 1024] == b"\x11" * (256 * 1024)
    assert snap[256 * 1024:320 * 1024] == b"\x22" * K64
    subprocess.run(["qemu-img", "snapshot", "-d", "s1", path], check=True)
    assert qemu_check(path).get("leaks", 0) == 0


def test_resize_read_by_qemu(tmp_path):
    path = make_image(tmp_path / "a.qcow2", MiB, 512, "v3")
    disk, node = open_image(path)
    disk.pwrite(0, b"a" * 4096)
    disk.resize(64 * MiB)                             # the L1 table grows: 32 -> 2048 entries
    disk.pwrite(64 * MiB - 8192, b"b" * 8192)
    disk.close()
    node.close()
    qemu_check(path)
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", path],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["virtual-size"] == 64 * MiB
    qemu_io(path, False, "read -P 0x61 0 4k", "read -P 0 4k 60m", "read -P 0x62 65528k 8k")


def test_zstd_compressed_clusters_are_refused(tmp_path):
    path = make_image(tmp_path / "a.qcow2", MiB, K64, "v3", extra="compression_type=zstd")
    qemu_io(path, False, "write -c -P 0x44 0 64k", "write -P 0x45 64k 64k")
    disk, node = open_image(path, read_only=True)
    assert disk.pread(K64, K64) == b"\x45" * K64
    with pytest.raises(OSError) as info:
        disk.pread(0, 512)
    assert info.value.errno == errno.ENOTSUP and "zstd" in info.value.strerror
    node.close()


def test_many_mixed_requests_match_qemu(tmp_path):
    """A longer random run with 512-byte clusters, compared once at the end."""
    path = make_image(tmp_path / "a.qcow2", 4 * MiB, 512, "v3")
    disk, node = open_image(path)
    rng = random.Random(11)
    model = bytearray(4 * MiB)
    for _ in range(300):
        off = rng.randrange(0, 4 * MiB - 70000)
        n = rng.randrange(1, 70000)
        if rng.random() < 0.7:
            data = rng.randbytes(n)
            disk.pwrite(off, data)
            model[off:off + n] = data
        else:
            disk.pwrite_zeroes(off, n, may_unmap=rng.random() < 0.5)
            model[off:off + n] = bytes(n)
    disk.close()
    node.close()
    qemu_check(path)
    assert qemu_raw(path) == model


@pytest.mark.parametrize("encrypted", [False, True])
def test_reads_without_waiting(tmp_path, encrypted):
    """pread_many on the event loop (no_waiting): a burst of normal, zero and
    unallocated ranges in one call equals the reads one by one; it gives up
    (BlockingIOError, nothing read) rather than wait for the metadata lock a
    thread holds, or inflate a compressed cluster on the loop."""
    import threading

    from qmpd.block.datapath import no_waiting

    path = make_image(tmp_path / "a.qcow2", MiB, K64, "v3", encrypted=encrypted)
    qemu_io(path, encrypted, "write -P 0x11 0 192k", "write -z 192k 64k", "write -c -P 0x22 512k 64k")
    disk, node = open_image(path, crypto=volume_cipher(path) if encrypted else None)
    try:
        ranges = [(0, 4096), (60 * 1024, 8192), (190 * 1024, 8192), (300 * 1024, 4096),
                  (4096, 65536)]
        expected = [disk.pread(offset, length) for offset, length in ranges]
        with no_waiting():
            assert disk.pread_many(ranges) == expected
            with pytest.raises(BlockingIOError):
                disk.pread_many([(0, 4096), (512 * 1024, 4096)])     # compressed
        assert disk.pread(512 * 1024, 4096) == b"\x22" * 4096           # fine in a thread
        held, release = threading.Event(), threading.Event()

        def hold():
            with disk._lock:
                held.set()
                release.wait(10)

        holder = threading.Thread(target=hold)
        holder.start()
        held.wait(10)
        try:
            with no_waiting():
                with pytest.raises(BlockingIOError):
                    disk.pread_many(ranges[:1])
                with pytest.raises(BlockingIOError):
                    disk.block_status(0, 4096)
        finally:
            release.set()
            holder.join()
        with no_waiting():
            assert disk.pread_many(ranges[:1]) == expected[:1]
            assert disk.block_status(0, 4096)[0].data
    finally:
        disk.close()
        node.close()
