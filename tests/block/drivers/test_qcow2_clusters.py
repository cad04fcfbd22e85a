"""Qcow2Clusters: model-based tests, crash injection, and the engine's own checks.

Images are made by qemu-img and checked by ``qemu-img check`` after every
example: leaks are allowed (a crash may leak, as in QEMU), errors are not.
"""

from __future__ import annotations

import atexit
import errno
import json
import os
import random
import shutil
import struct
import subprocess
import time
import tempfile

import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule, run_state_machine_as_test

from qmpd.block.drivers import qcow2_metadata as qcow2
from qmpd.block.drivers.file import FileNode, FileOptions, NodeRegionIO
from qmpd.block.drivers.qcow2_clusters import Qcow2Clusters, Qcow2Corruption
from qmpd.errors import QMPError
from tests.oracles import require

PASSWORD = "PW"
SECRET = f"secret,id=s0,data={PASSWORD}"
MiB = 1 << 20


# -- helpers shared with the interop tests -------------------------------------------

_TEMPLATES: dict[tuple, str] = {}      # encrypted images: qemu-img create takes ~2 s
_ORIGIN: dict[str, str] = {}          # image -> the template it was copied from
_CIPHERS: dict[str, object] = {}
_TEMPLATE_DIR = tempfile.mkdtemp(prefix="qcow2-templates-")
atexit.register(shutil.rmtree, _TEMPLATE_DIR, True)


def make_image(path, size=4 * MiB, cluster_size=65536, version="v3", refcount_bits=16,
               encrypted=False, lazy=False, extra: str = "") -> str:
    """A new image from qemu-img (encrypted ones: a copy of one made per configuration)."""
    require("qemu-img")
    if encrypted:
        key = (size, cluster_size, version, refcount_bits, lazy, extra)
        if key not in _TEMPLATES:
            template = os.path.join(_TEMPLATE_DIR, f"t{len(_TEMPLATES)}.qcow2")
            _create(template, size, cluster_size, version, refcount_bits, True, lazy, extra)
            _TEMPLATES[key] = template
        shutil.copy(_TEMPLATES[key], path)
        _ORIGIN[str(path)] = _TEMPLATES[key]
        return str(path)
    _create(path, size, cluster_size, version, refcount_bits, False, lazy, extra)
    return str(path)


def _create(path, size, cluster_size, version, refcount_bits, encrypted, lazy, extra) -> None:
    opts = [f"cluster_size={cluster_size}", f"compat={'0.10' if version == 'v2' else '1.1'}",
            f"refcount_bits={refcount_bits}"]
    if lazy:
        opts.append("lazy_refcounts=on")
    if extra:
        opts.append(extra)
    args = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if encrypted:
        args += ["--object", SECRET]
        opts += ["encrypt.format=luks", "encrypt.key-secret=s0"]
    # qemu-img's PBKDF2 benchmark fails now and then on a loaded machine
    # ("Unable to get accurate CPU usage") with a short iter-time: retry
    for attempt in range(30):
        iter_time = (10, 20, 50, 100, 200)[min(attempt // 3, 4)]
        extra_opts = [f"encrypt.iter-time={iter_time}"] if encrypted else []
        proc = subprocess.run(args + ["-o", ",".join(opts + extra_opts), str(path), str(size)],
                              capture_output=True, text=True)
        if proc.returncode == 0 or "accurate CPU usage" not in proc.stderr:
            break
        time.sleep(min(0.1 * (attempt + 1), 1.0))
    assert proc.returncode == 0, proc.stderr


def image_args(path, encrypted: bool) -> list[str]:
    """qemu-img/qemu-io arguments naming the image (with its key when encrypted)."""
    if encrypted:
        return ["--object", SECRET, "--image-opts",
                f"driver=qcow2,encrypt.key-secret=s0,file.filename={path}"]
    return ["-f", "qcow2", str(path)]


def volume_cipher(path):
    """The payload SectorCipher of an encrypted qcow2, through qmpd's LUKS engine."""
    origin = _ORIGIN.get(str(path), str(path))
    if origin not in _CIPHERS:
        _CIPHERS[origin] = _unlock(origin)
    return _CIPHERS[origin]


def _unlock(path):
    from qmpd.crypto.luks import open_volume
    node = FileNode(FileOptions(str(path), read_only=True))
    try:
        meta = qcow2.read_metadata(node.pread, node.size(), read_write=False)
        offset, length = meta.crypto_header
        return open_volume(NodeRegionIO(node, offset, length), PASSWORD.encode(),
                           payload_in_file=False).cipher
    finally:
        node.close()


def open_image(path, *, read_only=False, crypto=None, wrap=None, **kwargs):
    """(Qcow2Clusters, FileNode) over ``path``; ``wrap(node)`` may interpose a child."""
    node = FileNode(FileOptions(str(path), read_only=read_only))
    meta = qcow2.read_metadata(node.pread, node.size(), read_write=not read_only)
    child = wrap(node) if wrap else node
    return Qcow2Clusters(child, meta, read_only=read_only, crypto=crypto, **kwargs), node


def qemu_check(path, encrypted=False) -> dict:
    """``qemu-img check``: no corruptions and no check errors (leaks are fine)."""
    proc = subprocess.run(["qemu-img", "check", "--output=json"] + image_args(path, encrypted),
                          capture_output=True, text=True)
    assert proc.returncode in (0, 3), proc.stderr + proc.stdout
    report = json.loads(proc.stdout)
    assert report.get("corruptions", 0) == 0 and report.get("check-errors", 0) == 0, report
    return report


def qemu_raw(path, encrypted=False) -> bytes:
    out = str(path) + ".raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw"] + image_args(path, encrypted)[:-1]
                   + [image_args(path, encrypted)[-1], out], check=True)
    with open(out, "rb") as f:
        data = f.read()
    os.unlink(out)
    return data


def discarded(disk, offset: int, length: int) -> tuple[int, int]:
    """The byte range a discard zeroes: whole clusters only."""
    first, last = disk._whole_clusters(offset, length)
    cs = disk.cluster_size
    return first * cs, min(last * cs, disk.length())


# -- the model-based test --------------------------------------------------------------

CONFIGS = [(v, cs, enc) for enc in (False, True) for v in ("v2", "v3")
           for cs in (512, 4096, 65536, 2 * MiB)]


class Qcow2Model(RuleBasedStateMachine):
    """Random I/O against a bytearray model; reopen; qemu-img check at the end."""

    version, cluster_size, encrypted, tmp = "v3", 65536, False, "/tmp"

    def __init__(self) -> None:
        super().__init__()
        self.size = 8 * MiB if self.cluster_size >= MiB else 4 * MiB
        self.path = os.path.join(self.tmp, "model.qcow2")
        if os.path.exists(self.path):
            os.unlink(self.path)
        make_image(self.path, self.size, self.cluster_size, self.version,
                   encrypted=self.encrypted)
        self.cipher = volume_cipher(self.path) if self.encrypted else None
        self.align = 512 if self.encrypted else 1
        self.model = bytearray(self.size)
        self.disk, self.node = open_image(self.path, crypto=self.cipher)

    def teardown(self) -> None:
        self.disk.close()
        self.node.close()
        qemu_check(self.path, self.encrypted)
        assert qemu_raw(self.path, self.encrypted) == self.model

    def _range(self, data):
        align, cs = self.align, self.cluster_size
        units = self.size // align
        start = data.draw(st.one_of(
            st.integers(0, units - 1),
            st.integers(0, self.size // cs - 1).map(lambda c: c * cs // align)))
        start += data.draw(st.sampled_from([0, 0, 1, 3])) if align == 1 else 0
        start = min(start, units - 1)
        n = data.draw(st.integers(1, max(1, min(units - start, 3 * cs // align, 256 * 1024 // align))))
        return start * align, n * align

    @rule(data=st.data(), seed=st.integers(0, 2**32))
    def write(self, data, seed):
        offset, n = self._range(data)
        payload = random.Random(seed).randbytes(n)
        self.disk.pwrite(offset, payload)
        self.model[offset:offset + n] = payload

    @rule(data=st.data(), may_unmap=st.booleans(), fast=st.booleans())
    def zeroes(self, data, may_unmap, fast):
        offset, n = self._range(data)
        try:
            self.disk.pwrite_zeroes(offset, n, may_unmap=may_unmap, fast=fast)
        except OSError as err:
            assert fast and err.errno == errno.ENOTSUP
            return
        self.model[offset:offset + n] = bytes(n)

    @rule(data=st.data())
    def discard(self, data):
        offset, n = self._range(data)
        self.disk.pdiscard(offset, n)
        lo, hi = discarded(self.disk, offset, n)
        if hi > lo:
            self.model[lo:hi] = bytes(hi - lo)

    @rule(data=st.data())
    def read(self, data):
        offset, n = self._range(data)
        assert self.disk.pread(offset, n) == self.model[offset:offset + n]

    @rule(data=st.data())
    def status(self, data):
        offset, n = self._range(data)
        extents = self.disk.block_status(offset, n)
        assert sum(e.length for e in extents) == n
        pos = offset
        for e in extents:
            if e.zero:
                assert not any(self.model[pos:pos + e.length])
            pos += e.length

    @rule()
    def reopen(self):
        self.disk.flush()
        self.disk.close()
        self.node.close()
        self.disk, self.node = open_image(self.path, crypto=self.cipher)


def _run_model(tmp_path, version, cluster_size, encrypted, examples):
    class Machine(Qcow2Model):
        pass
    Machine.version, Machine.cluster_size, Machine.encrypted = version, cluster_size, encrypted
    Machine.tmp = str(tmp_path)
    require("qemu-img")
    run_state_machine_as_test(Machine, settings=settings(
        max_examples=examples, stateful_step_count=12, deadline=None, derandomize=True,
        database=None, suppress_health_check=list(HealthCheck)))


@pytest.mark.parametrize("version,cluster_size,encrypted", CONFIGS)
def test_model(tmp_path, version, cluster_size, encrypted):
    big = cluster_size >= MiB
    _run_model(tmp_path, version, cluster_size, encrypted,
               examples=(2 if big else 4) if encrypted else (4 if big else 10))


@pytest.mark.soak
@pytest.mark.parametrize("version,cluster_size,encrypted", CONFIGS)
def test_model_soak(tmp_path, version, cluster_size, encrypted):
    _run_model(tmp_path, version, cluster_size, encrypted, examples=150)


# -- crash injection -------------------------------------------------------------------

class Crash(Exception):
    pass


class WriteBackChild:
    """A file behind a volatile write-back cache, failing at write number ``fail_at``.

    Writes since the last flush are pending (reads see them). At the crash,
    each pending write independently survives, is lost, or is torn (only
    some of its 512-byte sectors land), as a disk cache may do.
    """

    def __init__(self, node: FileNode, fail_at: int | None, rng: random.Random) -> None:
        self.node, self.fail_at, self.rng = node, fail_at, rng
        self.pending: list[tuple[int, bytes]] = []
        self.writes = 0
        self.log: list[tuple[int, int]] = []

    def pread(self, offset, length):
        buf = bytearray(self.node.pread(offset, length))
        for at, data in self.pending:
            lo, hi = max(at, offset), min(at + len(data), offset + length)
            if lo < hi:
                if len(buf) < hi - offset:
                    buf += bytes(hi - offset - len(buf))
                buf[lo - offset:hi - offset] = data[lo - at:hi - at]
        return bytes(buf)

    def pwrite(self, offset, data):
        if self.writes == self.fail_at:
            raise Crash(self.writes)
        self.writes += 1
        self.log.append((offset, len(data)))
        self.pending.append((offset, bytes(data)))

    def flush(self):
        for at, data in self.pending:
            self.node.pwrite(at, data)
        self.pending.clear()

    def size(self):
        return max([self.node.size()] + [at + len(d) for at, d in self.pending])

    def truncate(self, size):
        self.node.truncate(size)           # the size is durable at once (it only grows)

    def crash(self):
        for at, data in self.pending:
            fate = self.rng.random()
            if fate < 0.4:
                continue
            if fate < 0.7 and len(data) > 512:
                for s in range(0, len(data), 512):
                    if self.rng.random() < 0.5:
                        self.node.pwrite(at + s, data[s:s + 512])
                continue
            self.node.pwrite(at, data)
        self.pending.clear()


def crash_workload(size, cs):
    """(op, args) steps; 'flush' steps are the durability points."""
    rng = random.Random(7)
    steps = []
    for i in range(14):
        off = rng.randrange(0, size - 3 * cs)
        kind = rng.choice(["write", "write", "write", "partial", "zeroes", "discard", "flush"])
        if kind == "write":
            steps.append(("write", off, rng.randbytes(rng.randrange(1, 2 * cs))))
        elif kind == "partial":      # a partial cluster: COW
            steps.append(("write", off - off % cs + 100, rng.randbytes(cs // 3)))
        elif kind == "zeroes":
            steps.append(("zeroes", off - off % cs, 2 * cs, rng.random() < 0.5))
        elif kind == "discard":
            steps.append(("discard", off - off % cs, 2 * cs))
        else:
            steps.append(("flush",))
    return steps


def apply(disk, step, model, touched):
    """Run one step; bytes it may change are marked touched before it starts."""
    kind = step[0]
    if kind == "flush":
        disk.flush()
        touched[:] = bytes(len(touched))
        return True
    if kind == "write":
        _, off, data = step
        touched[off:off + len(data)] = b"\1" * len(data)
        disk.pwrite(off, data)
        model[off:off + len(data)] = data
    elif kind == "zeroes":
        _, off, n, unmap = step
        touched[off:off + n] = b"\1" * n
        disk.pwrite_zeroes(off, n, may_unmap=unmap)
        model[off:off + n] = bytes(n)
    elif kind == "discard":
        _, off, n = step
        lo, hi = discarded(disk, off, n)
        touched[lo:hi] = b"\1" * (hi - lo)
        disk.pdiscard(off, n)
        model[lo:hi] = bytes(hi - lo)
    elif kind == "resize" and step[1] < len(model):     # shrink: the tail is unspecified
        touched[step[1]:] = b"\1" * (len(touched) - step[1])
        disk.resize(step[1])
        model[step[1]:] = bytes(len(model) - step[1])
    elif kind == "resize":
        touched += bytes(step[1] - len(touched))
        disk.resize(step[1])
        model += bytes(step[1] - len(model))
    return False


def run_crashes(tmp_path, base, steps, size, *, every=1, focus=None, initial=None):
    """Fail before each child write (every ``every``-th, and those ``focus`` picks)."""
    def run(fail_at, path):
        rng = random.Random(fail_at or 0)
        box = {}
        disk, node = open_image(path, wrap=lambda n: box.setdefault(
            "c", WriteBackChild(n, fail_at, rng)))
        child = box["c"]
        model, touched = bytearray(initial or size), bytearray(size)
        durable = bytearray(model)
        try:
            for step in steps:
                if apply(disk, step, model, touched):
                    durable = bytearray(model)
            disk.flush()
            durable = bytearray(model)
            touched[:] = bytes(len(touched))
            crashed = False
        except Crash:
            child.crash()
            crashed = True
        node.close()
        return child, durable, touched, crashed

    reference, *_ = run(None, base)
    run_crashes.reference_log = reference.log
    total = reference.writes
    assert total > 10
    points = [i for i in range(total) if i % every == 0 or (focus and focus(reference.log, i))]
    for fail_at in points:
        path = tmp_path / f"crash{fail_at}.qcow2"
        shutil.copy(base + ".orig", path)
        child, durable, touched, crashed = run(fail_at, str(path))
        assert crashed
        qemu_check(path)
        disk, node = open_image(path, read_only=True)
        data = disk.pread(0, min(disk.length(), len(durable)))
        node.close()
        for pos in range(0, len(data), 4096):
            chunk = slice(pos, pos + 4096)
            if not any(touched[chunk]):
                assert data[chunk] == durable[chunk], (fail_at, pos)
            elif data[chunk] != durable[chunk]:
                for i in range(pos, min(pos + 4096, len(data))):
                    assert touched[i] or data[i] == durable[i], (fail_at, i)
        path.unlink()
    return len(points)


@pytest.mark.parametrize("version,cluster_size", [("v3", 4096), ("v2", 512), ("v3", 65536)])
def test_crash_at_every_write(tmp_path, version, cluster_size):
    size = 2 * MiB
    base = make_image(tmp_path / "base.qcow2", size, cluster_size, version)
    shutil.copy(base, base + ".orig")
    assert run_crashes(tmp_path, base, crash_workload(size, cluster_size), size) > 10


@pytest.mark.parametrize("every", [pytest.param(4, id="sampled"),
                                   pytest.param(1, id="all", marks=pytest.mark.soak)])
def test_crash_while_refcount_table_and_l1_grow(tmp_path, every):
    """512-byte clusters, 64-bit refcounts: one table cluster describes 2 MiB.

    qemu-io fills the image close to that; the workload then grows the
    refcount table (header write at 48) and, by a resize, the L1 table
    (header write at 36), with a crash before every one of its writes.
    """
    size = 4 * MiB
    base = make_image(tmp_path / "base.qcow2", size, 512, "v3", refcount_bits=64)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1900k", base],
                   check=True, capture_output=True)
    shutil.copy(base, base + ".orig")
    initial = bytes([0x11]) * (1900 << 10) + bytes(size - (1900 << 10))
    rng = random.Random(3)
    steps = [("write", 2 * MiB, rng.randbytes(100 << 10)), ("write", 1000, rng.randbytes(3000)),
             ("flush",), ("resize", 8 * MiB), ("write", 7 * MiB + 512, rng.randbytes(700))]
    def focus(log, i):          # every write near a header update
        return any(off in (36, 48) for off, _ in log[max(0, i - 12):i + 13])
    count = run_crashes(tmp_path, base, steps, size, initial=initial, every=every, focus=focus)
    header_writes = {off for off, _ in run_crashes.reference_log if off < 512}
    assert {36, 48} <= header_writes and count > 20


@pytest.mark.parametrize("version,cluster_size", [("v3", 4096), ("v2", 512)])
def test_crash_while_shrinking(tmp_path, version, cluster_size):
    """block_resize to a smaller size: clusters past the end discarded, L2
    tables dropped, the file cut; a crash before any write leaks at most."""
    size = 2 * MiB
    base = make_image(tmp_path / "base.qcow2", size, cluster_size, version)
    shutil.copy(base, base + ".orig")
    rng = random.Random(5)
    steps = [("write", 0, rng.randbytes(300 << 10)), ("write", MiB + 77, rng.randbytes(600 << 10)),
             ("flush",), ("resize", MiB + 1536), ("write", MiB - 700, rng.randbytes(1400)),
             ("flush",), ("resize", 512 << 10), ("resize", size), ("write", size - 4096, b"t" * 4096)]
    # 512-byte clusters make thousands of metadata writes: crash at a sample
    assert run_crashes(tmp_path, base, steps, size, every=6 if cluster_size >= 4096 else 40) > 10


# -- the engine's own checks -----------------------------------------------------------

@pytest.mark.parametrize("bits,size,written", [(64, 4 * MiB, 3 * MiB), (16, 10 * MiB, 9 * MiB)])
def test_refcount_table_grows_with_small_clusters(tmp_path, bits, size, written):
    path = make_image(tmp_path / "a.qcow2", size, 512, "v3", refcount_bits=bits)
    disk, node = open_image(path)
    old = disk.header.refcount_table_offset
    payload = random.Random(1).randbytes(written)
    for pos in range(0, len(payload), 256 * 1024):
        disk.pwrite(pos, payload[pos:pos + 256 * 1024])
    assert disk.header.refcount_table_offset != old
    assert disk.header.refcount_table_clusters > 1
    disk.close()
    node.close()
    report = qemu_check(path)
    assert report.get("leaks", 0) == 0
    assert qemu_raw(path)[:len(payload)] == payload


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 32, 64])
def test_refcount_widths(tmp_path, bits):
    path = make_image(tmp_path / "a.qcow2", 4 * MiB, 512, "v3", refcount_bits=bits)
    disk, node = open_image(path)
    payload = random.Random(bits).randbytes(3 * MiB)
    disk.pwrite(0, payload)
    disk.pdiscard(MiB, MiB)
    disk.pwrite(MiB + 512, b"x" * 5000)
    disk.close()
    node.close()
    assert qemu_check(path).get("leaks", 0) == 0
    expect = bytearray(payload)
    expect[MiB:2 * MiB] = bytes(MiB)
    expect[MiB + 512:MiB + 5512] = b"x" * 5000
    assert qemu_raw(path)[:3 * MiB] == expect


def test_freed_clusters_are_reused(tmp_path):
    path = make_image(tmp_path / "a.qcow2", 4 * MiB, 65536, "v3")
    disk, node = open_image(path)
    disk.pwrite(0, b"a" * MiB)
    end = node.size()
    disk.pdiscard(0, MiB)
    disk.pwrite(2 * MiB, b"b" * MiB)
    assert node.size() == end
    disk.close()
    node.close()
    assert qemu_check(path).get("leaks", 0) == 0


def test_v3_zero_and_discard_entries(tmp_path):
    cs = 65536
    path = make_image(tmp_path / "a.qcow2", 4 * MiB, cs, "v3")
    disk, node = open_image(path)
    disk.pwrite(0, b"d" * (4 * cs))
    host1 = disk._entry(1) & 0x00FFFFFFFFFFFE00
    disk.pwrite_zeroes(cs, cs)                       # keeps the allocation
    assert disk._entry(1) == host1 | 1 << 63 | 1
    disk.pwrite_zeroes(2 * cs, cs, may_unmap=True)    # frees it
    assert disk._entry(2) == 1
    disk.pdiscard(3 * cs, cs)
    assert disk._entry(3) == 1                       # QEMU 7.2 v3: ZERO flag, unallocated
    disk.pdiscard(10, cs)                            # no whole cluster: ignored
    assert disk.pread(0, 20) == b"d" * 20
    ext = disk.block_status(0, 5 * cs)
    assert [(e.length, e.data, e.zero, e.allocated) for e in ext] == [
        (cs, True, False, True), (3 * cs, False, True, True), (cs, False, True, False)]
    with pytest.raises(OSError) as info:
        disk.pwrite_zeroes(100, 10, fast=True)
    assert info.value.errno == errno.ENOTSUP
    disk.pwrite_zeroes(cs + 100, 10, fast=True)       # already zero: fine
    disk.close()
    node.close()
    assert qemu_check(path).get("leaks", 0) == 0


def test_v2_zeroes(tmp_path):
    cs = 4096
    path = make_image(tmp_path / "a.qcow2", MiB, cs, "v2")
    disk, node = open_image(path)
    disk.pwrite(0, b"d" * (3 * cs))
    with pytest.raises(OSError) as info:
        disk.pwrite_zeroes(0, cs, fast=True)
    assert info.value.errno == errno.ENOTSUP
    disk.pwrite_zeroes(0, cs)                         # zero data, stays allocated
    assert disk.block_status(0, cs)[0].data
    disk.pwrite_zeroes(cs, cs, may_unmap=True, fast=True)   # unmapped: entry 0
    assert disk._entry(1) == 0
    disk.pdiscard(2 * cs, cs)
    assert disk._entry(2) == 0
    disk.pwrite_zeroes(5 * cs, 10 * cs, fast=True)    # unallocated already
    assert disk.pread(0, 3 * cs) == bytes(3 * cs)
    disk.close()
    node.close()
    qemu_check(path)


def test_unaligned_l2_offset_is_corruption(tmp_path):
    path = make_image(tmp_path / "a.qcow2", MiB, 65536, "v3")
    disk, node = open_image(path)
    disk.pwrite(0, b"x" * 512)
    disk.close()
    node.close()
    with open(path, "r+b") as f:
        f.seek(0x30000)                               # qemu-img's L1 table
        entry = struct.unpack(">Q", f.read(8))[0]
        f.seek(0x30000)
        f.write(struct.pack(">Q", entry + 512))
    disk, node = open_image(path)
    with pytest.raises(Qcow2Corruption) as info:
        disk.pread(0, 512)
    assert info.value.errno == errno.EIO and isinstance(info.value, QMPError)
    assert "L2 table offset 0x40200 unaligned (L1 index: 0x0)" in info.value.desc
    with pytest.raises(OSError):
        disk.pread(65536, 512)                        # the node stays unusable
    node.close()
    out = subprocess.run(["qemu-img", "info", "--output=json", path], capture_output=True,
                         text=True, check=True).stdout
    assert json.loads(out)["format-specific"]["data"]["corrupt"] is True
    node = FileNode(FileOptions(path))
    with pytest.raises(QMPError, match="Image is corrupt; cannot be opened read/write"):
        meta = qcow2.read_metadata(node.pread, node.size(), read_write=False)
        Qcow2Clusters(node, meta, read_only=False)
    node.close()


def test_lazy_refcounts_dirty_bit(tmp_path):
    path = make_image(tmp_path / "a.qcow2", MiB, 65536, "v3", lazy=True)
    disk, node = open_image(path)
    disk.pwrite(0, b"x" * 512)
    with open(path, "rb") as f:
        assert struct.unpack(">Q", f.read(80)[72:80])[0] & qcow2.INCOMPAT_DIRTY
    disk.pwrite(0, b"y" * 512)
    disk.flush()                                      # durable, but left dirty: "crash"
    node.close()
    with pytest.raises(QMPError, match="dirty bit"):
        open_image(path)
    ro, ro_node = open_image(path, read_only=True)
    assert ro.pread(0, 1) == b"y"
    ro_node.close()
    # a clean close clears it
    path2 = make_image(tmp_path / "b.qcow2", MiB, 65536, "v3", lazy=True)
    disk, node = open_image(path2)
    disk.pwrite(0, b"x" * 512)
    disk.close()
    node.close()
    with open(path2, "rb") as f:
        assert not struct.unpack(">Q", f.read(80)[72:80])[0] & qcow2.INCOMPAT_DIRTY
    qemu_check(path2)


def test_resize(tmp_path):
    path = make_image(tmp_path / "a.qcow2", MiB, 512, "v3")
    disk, node = open_image(path)
    disk.pwrite(0, b"a" * 4096)
    old_l1 = disk.header.l1_table_offset
    disk.resize(16 * MiB)
    assert disk.length() == 16 * MiB and disk.header.l1_table_offset != old_l1
    disk.pwrite(16 * MiB - 4096, b"z" * 4096)
    disk.close()
    node.close()
    qemu_check(path)
    raw = qemu_raw(path)
    assert len(raw) == 16 * MiB and raw[:4096] == b"a" * 4096 and raw[-4096:] == b"z" * 4096
    disk, node = open_image(path)
    end = node.size()
    disk.resize(MiB)           # shrinking, as QEMU 7.2: the tail discarded, the file cut
    assert disk.length() == MiB and node.size() < end
    disk.resize(16 * MiB)
    assert disk.pread(16 * MiB - 4096, 4096) == bytes(4096)
    disk.close()
    node.close()
    qemu_check(path)
    raw = qemu_raw(path)
    assert len(raw) == 16 * MiB and raw[:4096] == b"a" * 4096 and raw[4096:] == bytes(len(raw) - 4096)


def test_parallel_requests(tmp_path):
    import threading
    cs = 4096
    path = make_image(tmp_path / "a.qcow2", 4 * MiB, cs, "v3")
    disk, node = open_image(path)
    disk.pwrite(0, bytes(range(256)) * (4 * MiB // 256))    # allocated: in place later
    errors = []

    def worker(n):
        rng = random.Random(n)
        base = n * MiB
        try:
            for i in range(60):
                off = base + rng.randrange(0, MiB - 3 * cs)
                data = bytes([n + 1]) * rng.randrange(1, 3 * cs)
                kind = rng.random()
                if kind < 0.2:
                    disk.pdiscard(off, len(data))
                    lo, hi = discarded(disk, off, len(data))
                    disk.pwrite(lo, bytes([n + 1]) * (hi - lo))
                    off, data = lo, bytes([n + 1]) * (hi - lo)
                else:
                    disk.pwrite(off, data)
                assert disk.pread(off, len(data)) == data
        except BaseException as err:   # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    disk.close()
    node.close()
    qemu_check(path)


def test_read_only_and_range_checks(tmp_path):
    path = make_image(tmp_path / "a.qcow2", MiB, 65536, "v3")
    disk, node = open_image(path, read_only=True)
    assert disk.pread(0, 100) == bytes(100)
    for call in (lambda: disk.pwrite(0, b"x"), lambda: disk.pdiscard(0, 65536),
                 lambda: disk.pwrite_zeroes(0, 512)):
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.EPERM
    with pytest.raises(OSError) as info:
        disk.pread(MiB - 1, 2)
    assert info.value.errno == errno.EINVAL
    assert disk.block_status(MiB - 10, 10)[0].length == 10
    node.close()


def test_unwritten_l2_entries_go_out_before_their_table_leaves_the_cache(tmp_path):
    """L2 entries are written back at flush; a table evicted from a small
    cache is written first (after a flush), so its entries survive a crash
    that loses the ones still in memory; on the event loop (no_waiting) a
    load that would evict such a table gives up instead of flushing."""
    from qmpd.block.datapath import no_waiting

    cs = 512                                   # an L2 table maps 64 clusters: 32 KiB
    path = make_image(tmp_path / "a.qcow2", MiB, cs, "v3")
    disk, node = open_image(path, l2_cache_bytes=2 * cs)        # two tables cached
    span = (cs // 8) * cs
    for t in range(4):
        disk.pwrite(t * span, bytes([t + 1]) * cs)
    assert len(disk._dirty_l2) == 2            # the last two, still in memory
    with no_waiting(), pytest.raises(BlockingIOError):
        disk.pread(0, cs)                      # table 0 back: would evict a dirty one
    node.close()                               # "crash": no flush, no close
    disk, node = open_image(path, read_only=True)
    assert [disk.pread(t * span, 1) for t in range(4)] == [b"\x01", b"\x02", b"\0", b"\0"]
    node.close()
    qemu_check(path)
    # a flush writes them all
    disk, node = open_image(path)
    for t in range(4):
        disk.pwrite(t * span, bytes([t + 5]) * cs)
    disk.flush()
    node.close()
    disk, node = open_image(path, read_only=True)
    assert [disk.pread(t * span, 1) for t in range(4)] == [bytes([t + 5]) for t in range(4)]
    node.close()
    qemu_check(path)


@pytest.mark.parametrize("encrypted", [False, True])
def test_concurrent_writes_into_one_new_cluster_keep_every_byte(tmp_path, encrypted):
    """Allocating writes encrypt and write outside the metadata lock; writes
    into the same guest clusters wait for each other, so sub-cluster writes
    from many threads into unallocated clusters (each one a COW of the
    rest) all survive, and zeroes/discards in between never free a cluster
    a write is still filling."""
    import threading

    cs = 65536
    path = make_image(tmp_path / "a.qcow2", 4 * MiB, cs, "v3", encrypted=encrypted)
    disk, node = open_image(path, crypto=volume_cipher(path) if encrypted else None)
    start = threading.Barrier(8)
    errors = []

    def worker(n):
        try:
            start.wait(10)
            for rnd in range(6):
                base = rnd * 2 * cs                      # two clusters per round, all threads
                disk.pwrite(base + n * 4096, bytes([n + 1]) * 4096)
                disk.pwrite(base + cs + n * 4096 + 512, bytes([n + 17]) * 1024)
                if n == 7:
                    disk.pwrite_zeroes(base + cs + 60 * 1024, 1024)
        except BaseException as err:   # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for rnd in range(6):
        base = rnd * 2 * cs
        for n in range(8):
            assert disk.pread(base + n * 4096, 4096) == bytes([n + 1]) * 4096
            got = disk.pread(base + cs + n * 4096, 4096)
            assert got == bytes(512) + bytes([n + 17]) * 1024 + bytes(2560)
    disk.flush()
    disk.close()
    node.close()
    qemu_check(path, encrypted)
