"""OFD lock bytes: our own bookkeeping, /proc/locks, and QEMU's tools as peers."""

import os
import subprocess
import time

import pytest

from qmpd.block.drivers.file import FileNode, FileOptions
from qmpd.block.locks import ImageLock, ofd_byte_is_held
from qmpd.block.permissions import ALL, Perm
from qmpd.errors import QMPError
from tests.oracles import require

CR, W, R = Perm.CONSISTENT_READ, Perm.WRITE, Perm.RESIZE


def held_bytes(path: str) -> set[int]:
    """Bytes locked on ``path`` by anyone, from /proc/locks."""
    st = os.stat(path)
    out = set()
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            if "OFDLCK" not in parts:
                continue
            dev_ino = parts[-3].split(":")
            if int(dev_ino[2]) != st.st_ino:
                continue
            start, end = int(parts[-2]), int(parts[-1])
            out.update(range(start, end + 1))
    return out


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "img"
    path.write_bytes(bytes(4096))
    return str(path)


def test_lock_bytes_follow_permissions(image):
    node = FileNode(FileOptions(image))
    try:
        node.set_perm(CR | W | R, ALL & ~(W | R))
        assert held_bytes(image) == {100, 101, 103, 201, 203}
        node.set_perm(CR, ALL)
        assert held_bytes(image) == {100}
    finally:
        node.close()
    assert held_bytes(image) == set()


def test_second_descriptor_sees_conflicts_with_qemu_texts(image):
    a = FileNode(FileOptions(image))
    b = FileNode(FileOptions(image))
    try:
        a.set_perm(CR | W, ALL & ~(CR | W))
        with pytest.raises(QMPError) as info:
            b.set_perm(CR, ALL)
        assert info.value.desc == 'Failed to get "consistent read" lock'
        a.set_perm(CR, ALL)
        with pytest.raises(QMPError) as info:
            b.set_perm(CR, ALL & ~CR)
        assert info.value.desc == 'Failed to get shared "consistent read" lock'
        # a failed update leaves no stray bytes behind
        assert held_bytes(image) == {100}
    finally:
        a.close()
        b.close()


def test_locking_off_takes_nothing(image):
    node = FileNode(FileOptions(image, locking="off"))
    try:
        node.set_perm(CR | W, ALL & ~W)
        assert held_bytes(image) == set()
    finally:
        node.close()


def test_own_descriptor_is_not_a_conflict(image):
    fd = os.open(image, os.O_RDWR)
    try:
        lock = ImageLock(fd, enabled=True)
        lock.update(CR | W, ALL & ~W)
        assert not ofd_byte_is_held(fd, 201)
        other = os.open(image, os.O_RDONLY)
        try:
            assert ofd_byte_is_held(other, 201)
        finally:
            os.close(other)
    finally:
        os.close(fd)


@pytest.mark.interop
def test_qemu_io_refused_while_we_hold_write_unshared(image):
    require("qemu-io")
    node = FileNode(FileOptions(image))
    try:
        node.set_perm(CR | W | R, ALL & ~(W | R))
        proc = subprocess.run(["qemu-io", "-f", "raw", "-c", "read 0 512", image],
                              capture_output=True, text=True)
        assert proc.returncode != 0
        assert 'Failed to get "write" lock' in proc.stderr
        assert f"Is another process using the image [{image}]?" in proc.stderr
        proc = subprocess.run(["qemu-io", "-r", "-U", "-f", "raw", "-c", "read 0 512", image],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    finally:
        node.close()
    proc = subprocess.run(["qemu-io", "-f", "raw", "-c", "read 0 512", image],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.interop
def test_we_are_refused_while_qemu_io_holds_the_image(image):
    require("qemu-io")
    proc = subprocess.Popen(["qemu-io", "-f", "raw", image], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while 101 not in held_bytes(image):
            assert time.monotonic() < deadline, "qemu-io did not lock the image"
            time.sleep(0.02)
        node = FileNode(FileOptions(image))
        try:
            with pytest.raises(QMPError) as info:
                node.set_perm(CR, ALL & ~W)
            assert info.value.desc == 'Failed to get shared "write" lock'
            node.set_perm(CR, ALL)  # sharing everything is fine
        finally:
            node.close()
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)
