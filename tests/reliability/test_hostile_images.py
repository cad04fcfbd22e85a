"""Corrupt and hostile images: every blockdev-add answers, nothing dies, nothing is spoilt.

- LUKS headers with each field overwritten (zeros, all-ones, random,
  boundary numbers), random byte flips in header and key material, and
  truncations; qcow2 headers, header extensions and the LUKS header inside
  qcow2 likewise. Each is opened with ``blockdev-add`` on one connection:
  the reply is ``return`` or an ``error`` with a text, never "Internal
  error", and the daemon keeps answering.
- A header asking for about two billion PBKDF2 iterations: its
  ``blockdev-add`` is slow, other sessions are not; an amend job slowed
  down that way can be cancelled.
- EIO on the Nth read, write or sync (injected at the ImageIO layer under
  the LUKS engine), files that shrink while open: a clear error, and the
  image on disk still opens with every passphrase it had.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import struct
import tempfile
import time

import pytest

from qmpd.block import blockdev, query
from qmpd.block import amend as block_amend
from qmpd.posixio import FileImageIO
from qmpd.crypto.luks import LuksCreateOptions, create_volume, open_volume
from tests.oracles import qemu_img_create_luks as qemu_img_luks
from tests.reliability.launch import start_qmpd, stop
from tests.qmp_client import QmpClient

P0, P1 = "hostile-zero", "hostile-one"

#: LUKS1 header fields: (name, offset, length); iteration counts apart.
LUKS_FIELDS = [("magic", 0, 6), ("version", 6, 2), ("cipher-name", 8, 32),
               ("cipher-mode", 40, 32), ("hash-spec", 72, 32), ("payload-offset", 104, 4),
               ("key-bytes", 108, 4), ("mk-digest", 112, 20), ("mk-digest-salt", 132, 32),
               ("uuid", 168, 40)]
for _i in range(8):
    _base = 208 + 48 * _i
    LUKS_FIELDS += [(f"slot{_i}.active", _base, 4), (f"slot{_i}.salt", _base + 8, 32),
                    (f"slot{_i}.key-offset", _base + 40, 4), (f"slot{_i}.stripes", _base + 44, 4)]
#: Iteration counts get only small values here (big ones have their own test).
LUKS_ITERATION_FIELDS = [("mk-digest-iter", 164)] + [(f"slot{i}.iterations", 212 + 48 * i)
                                                    for i in range(8)]

QCOW2_FIELDS = [("magic", 0, 4), ("version", 4, 4), ("backing-file-offset", 8, 8),
                ("backing-file-size", 16, 4), ("cluster-bits", 20, 4), ("size", 24, 8),
                ("crypt-method", 32, 4), ("l1-size", 36, 4), ("l1-table-offset", 40, 8),
                ("refcount-table-offset", 48, 8), ("refcount-table-clusters", 56, 4),
                ("nb-snapshots", 60, 4), ("snapshots-offset", 64, 8),
                ("incompatible-features", 72, 8), ("compatible-features", 80, 8),
                ("autoclear-features", 88, 8), ("refcount-order", 96, 4),
                ("header-length", 100, 4)]


def _field_values(rng: random.Random, length: int) -> list[bytes]:
    values = [bytes(length), b"\xff" * length, rng.randbytes(length)]
    if length in (4, 8):
        fmt = ">I" if length == 4 else ">Q"
        values += [struct.pack(fmt, 1), struct.pack(fmt, 0x7FFFFFFF),
                   struct.pack(fmt, 1 << (8 * length - 1))]
    return values


def corrupt_variants(image: bytes, fields, iteration_fields, rng: random.Random, flips: int,
                     flip_range: tuple[int, int], base: int = 0):
    """(label, bytes) for every field mutation, random flips and truncations."""
    for name, offset, length in fields:
        for value in _field_values(rng, length):
            data = bytearray(image)
            data[base + offset:base + offset + length] = value
            yield f"{name}={value.hex()[:16]}", bytes(data)
    for name, offset in iteration_fields:
        for count in (0, 1, 999, 1000, 5000):
            data = bytearray(image)
            data[base + offset:base + offset + 4] = struct.pack(">I", count)
            yield f"{name}={count}", bytes(data)
    for _ in range(flips):
        data = bytearray(image)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(*flip_range)
            data[i] = rng.randrange(256)
        # Keep iteration counts sane: a flipped high byte asks for billions,
        # which is the slow-header case with tests of its own.
        for _, offset in iteration_fields:
            data[base + offset:base + offset + 4] = image[base + offset:base + offset + 4]
        yield "flips", bytes(data)
    for cut in (0, 1, 100, 591, 592, 1000, 4096, 8192, len(image) // 2, len(image) - 1):
        yield f"truncated to {cut}", image[:cut]


def _check_answers(q: QmpClient, path: str, variants, node: dict) -> tuple[int, int]:
    """blockdev-add each variant; (answered, opened)."""
    answered = opened = 0
    for label, data in variants:
        with open(path, "wb") as f:
            f.write(data)
        reply = q.cmd("blockdev-add", node)
        assert ("return" in reply) != ("error" in reply), (label, reply)
        if "error" in reply:
            desc = reply["error"]["desc"]
            assert desc and "Internal error" not in desc, (label, desc)
        else:
            opened += 1
            q.ok("blockdev-del", {"node-name": node["node-name"]})
        answered += 1
    assert q.ok("query-version")
    return answered, opened


@pytest.fixture
def workdir():
    path = tempfile.mkdtemp(prefix="qmpd-h-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _make_luks(path: str, size: int = 4 << 20) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
    with FileImageIO(path) as io:
        create_volume(io, bytearray(P0.encode()), LuksCreateOptions(iter_time=1)).close()


def _fast_slots(fields, soak: bool):
    """Fast mode: slots 0, 1 (first inactive), 6 (straddles two sectors) and 7."""
    if soak:
        return fields
    return [f for f in fields if not f[0].startswith(("slot2", "slot3", "slot4", "slot5"))]


def test_corrupt_luks_headers(workdir, scale, soak, figures):
    template = os.path.join(workdir, "t.luks")
    _make_luks(template, 2 << 20)
    image = open(template, "rb").read()
    sock = os.path.join(workdir, "q.sock")
    proc = start_qmpd(sock, os.path.join(workdir, "q.log"), "--object", f"secret,id=s0,data={P0}")
    rng = random.Random(592)
    try:
        with QmpClient(sock, timeout=60) as q:
            q.negotiate()
            target = os.path.join(workdir, "victim.luks")
            node = {"driver": "luks", "node-name": "v", "key-secret": "s0",
                    "file": {"driver": "file", "filename": target}}
            answered, opened = _check_answers(q, target, corrupt_variants(
                image, _fast_slots(LUKS_FIELDS, soak), LUKS_ITERATION_FIELDS,
                rng, scale(60, 5000), (0, 4096 + 2048)),
                node)
    finally:
        stop(proc)
    figures("corrupt LUKS headers answered (opened anyway)", f"{answered} ({opened})")
    assert answered > 200


@pytest.mark.interop
def test_corrupt_qcow2_headers_and_extensions(workdir, scale, soak, figures):
    template = os.path.join(workdir, "t.qcow2")
    qemu_img_luks(template, P0, fmt="qcow2", size="4M")
    image = open(template, "rb").read()
    fde = image.find(b"\x05\x37\xbe\x77")
    assert fde > 0
    luks_offset = struct.unpack(">Q", image[fde + 8:fde + 16])[0]
    sock = os.path.join(workdir, "q.sock")
    proc = start_qmpd(sock, os.path.join(workdir, "q.log"), "--object", f"secret,id=s0,data={P0}")
    rng = random.Random(0x514649FB)
    try:
        with QmpClient(sock, timeout=60) as q:
            q.negotiate()
            target = os.path.join(workdir, "victim.qcow2")
            node = {"driver": "qcow2", "node-name": "v",
                    "encrypt": {"format": "luks", "key-secret": "s0"},
                    "file": {"driver": "file", "filename": target}}
            variants = list(corrupt_variants(image, QCOW2_FIELDS, [], rng, scale(25, 4000),
                                             (0, fde + 64)))
            extension = [("fde.length", fde + 4, 4), ("fde.offset", fde + 8, 8),
                         ("fde.size", fde + 16, 8), ("ext.magic", fde, 4)]
            variants += list(corrupt_variants(image, extension, [], rng, 0, (0, 1)))[:-10]
            # The inner LUKS header: fast mode takes a sample (the raw LUKS test
            # covers every field).
            inner = LUKS_FIELDS if soak else LUKS_FIELDS[:10:3] + LUKS_FIELDS[10:14]
            variants += list(corrupt_variants(image, inner, LUKS_ITERATION_FIELDS, rng,
                                              scale(15, 2000),
                                              (luks_offset, luks_offset + 4096),
                                              base=luks_offset))[:-10]
            answered, opened = _check_answers(q, target, variants, node)
    finally:
        stop(proc)
    figures("corrupt qcow2 headers/extensions/inner LUKS answered (opened anyway)",
            f"{answered} ({opened})")


def _forge_iterations(path: str, slot: int, iterations: int, active: bool = True) -> None:
    with open(path, "r+b") as f:
        f.seek(208 + 48 * slot)
        entry = bytearray(f.read(48))
        if active:
            entry[0:4] = struct.pack(">I", 0x00AC71F3)
        entry[4:8] = struct.pack(">I", iterations)
        f.seek(208 + 48 * slot)
        f.write(entry)


HUGE_ITERATIONS = 2_000_000_000


def test_billions_of_iterations_slow_only_their_own_session(workdir, figures):
    image = os.path.join(workdir, "slow.luks")
    _make_luks(image)
    _forge_iterations(image, 0, HUGE_ITERATIONS)
    sock = os.path.join(workdir, "q.sock")
    proc = start_qmpd(sock, os.path.join(workdir, "q.log"), "--object", f"secret,id=s0,data={P0}")
    try:
        slow = QmpClient(sock).negotiate()
        other = QmpClient(sock).negotiate()
        slow.send(b'{"execute": "blockdev-add", "arguments": {"driver": "luks", '
                  b'"node-name": "slow", "key-secret": "s0", "file": {"driver": "file", '
                  b'"filename": "' + image.encode() + b'"}}}')
        time.sleep(0.2)
        latencies = []
        for _ in range(100):
            start = time.monotonic()
            other.ok("query-version")
            other.ok("query-named-block-nodes")
            latencies.append(time.monotonic() - start)
        latencies.sort()
        figures("billions of iterations: other session p50/max latency (ms)",
                f"{latencies[50] * 1000:.1f}/{latencies[-1] * 1000:.1f}")
        assert latencies[50] < 0.02 and latencies[-1] < 0.5
    finally:
        proc.kill()  # the PBKDF2 thread would run for minutes
        proc.wait()


def test_amend_slowed_by_a_hostile_slot_can_be_cancelled(workdir, figures):
    """Slot 0 opens with P0; slot 1 claims 2e9 iterations. Erasing by a passphrase
    makes the amend try slot 1 (minutes of PBKDF2); job-cancel ends the job."""
    image = os.path.join(workdir, "slow.luks")
    _make_luks(image)
    _forge_iterations(image, 1, HUGE_ITERATIONS)
    sock = os.path.join(workdir, "q.sock")
    proc = start_qmpd(sock, os.path.join(workdir, "q.log"), "--object", f"secret,id=s0,data={P0}",
                      "--object", f"secret,id=s1,data={P1}")
    try:
        with QmpClient(sock) as q:
            q.negotiate()
            q.ok("blockdev-add", {"driver": "luks", "node-name": "d0", "key-secret": "s0",
                                  "file": {"driver": "file", "filename": image}})
            q.ok("x-blockdev-amend", {"job-id": "slow", "node-name": "d0", "options": {
                "driver": "luks", "state": "inactive", "old-secret": "s1"}})
            q.wait_event("JOB_STATUS_CHANGE", id="slow", status="running")
            time.sleep(0.3)
            start = time.monotonic()
            q.ok("job-cancel", {"id": "slow"})
            q.wait_event("JOB_STATUS_CHANGE", timeout=30, id="slow", status="concluded")
            took = time.monotonic() - start
            figures("hostile-slot amend: job-cancel to concluded (s)", round(took, 3))
            assert took < 5
            q.ok("job-dismiss", {"id": "slow"})
            assert q.ok("query-version")
    finally:
        proc.kill()
        proc.wait()
    # Slot 0 is intact. (Opened from a copy without the hostile slot: an
    # unlock may try slots in parallel and would compute slot 1 for minutes.)
    tame = os.path.join(workdir, "tame.luks")
    shutil.copyfile(image, tame)
    _forge_iterations(tame, 1, 1000, active=False)
    with open(tame, "r+b") as f:
        f.seek(208 + 48)
        f.write(struct.pack(">I", 0x0000DEAD))
    with FileImageIO(tame, readonly=True) as io:
        open_volume(io, bytearray(P0.encode())).close()


class FailingIO:
    """An ImageIO that raises EIO on its Nth call of one kind (read, write or sync)."""

    def __init__(self, inner, kind: str, n: int) -> None:
        self.inner, self.kind, self.n = inner, kind, n
        self.calls = {"read": 0, "write": 0, "sync": 0}

    def _tick(self, kind: str) -> None:
        self.calls[kind] += 1
        if kind == self.kind and self.calls[kind] == self.n:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    def read(self, offset, length):
        self._tick("read")
        return self.inner.read(offset, length)

    def write(self, offset, data):
        self._tick("write")
        self.inner.write(offset, data)

    def sync(self):
        self._tick("sync")
        self.inner.sync()

    def size(self):
        return self.inner.size()


class _Progress:
    def set(self, current: int, total: int) -> None:
        pass


def _volume_key(path: str, passphrase: str) -> bytes | None:
    with FileImageIO(path, readonly=True) as io:
        try:
            with open_volume(io, bytearray(passphrase.encode())) as volume:
                return bytes(volume.volume_key)
        except Exception:
            return None


async def _daemon_with_node(image: str):
    from qmpd.daemon import Daemon

    daemon = Daemon()
    for sid, data in (("s0", P0), ("s1", P1)):
        daemon.secrets.add(sid, data=data)
        daemon.objects[sid] = "secret"
    await blockdev.add(daemon.nodes, {"driver": "luks", "node-name": "d0", "key-secret": "s0",
                            "file": {"driver": "file", "filename": image}})
    return daemon, daemon.nodes.find("d0")


ADD_P1 = {"driver": "luks", "state": "active", "new-secret": "s1", "iter-time": 10}
ERASE_P1 = {"driver": "luks", "state": "inactive", "old-secret": "s1"}


async def test_eio_at_every_io_call_of_an_amend(workdir, figures):
    """EIO on each read, write and sync of key add and erase in turn: a clear
    error, P0 and the volume key intact on disk, and the node still works."""
    from qmpd.errors import QMPError

    template = os.path.join(workdir, "t.luks")
    _make_luks(template)
    key = _volume_key(template, P0)
    with_p1 = os.path.join(workdir, "t1.luks")
    shutil.copyfile(template, with_p1)
    daemon, node = await _daemon_with_node(with_p1)
    await block_amend.run(daemon.nodes, "d0", ADD_P1, False, _Progress(), "x-blockdev-amend")
    await daemon.close()
    injected = 0
    for start, options, removed in ((template, ADD_P1, None), (with_p1, ERASE_P1, P1)):
        # Count the calls of a clean run first.
        image = os.path.join(workdir, "v.luks")
        shutil.copyfile(start, image)
        daemon, node = await _daemon_with_node(image)
        counting = []
        original = node.luks_io
        node.luks_io = lambda handle: counting.append(FailingIO(original(handle), "-", 0)) \
            or counting[-1]
        await block_amend.run(daemon.nodes, "d0", options, False, _Progress(), "x-blockdev-amend")
        await daemon.close()
        totals = {k: max(c.calls[k] for c in counting) for k in ("read", "write", "sync")}
        assert totals["write"] and totals["sync"]
        for kind, total in totals.items():
            for n in range(1, total + 1):
                shutil.copyfile(start, image)
                daemon, node = await _daemon_with_node(image)
                original = node.luks_io
                node.luks_io = lambda handle, k=kind, n=n: FailingIO(original(handle), k, n)
                with pytest.raises(QMPError) as err:
                    await block_amend.run(daemon.nodes, "d0", options, False, _Progress(),
                                             "x-blockdev-amend")
                assert err.value.desc == "Input/output error", err.value.desc
                injected += 1
                assert _volume_key(image, P0) == key, (kind, n)
                if removed is None:
                    assert _volume_key(start, P1) is None  # P1 was being added
                else:
                    assert _volume_key(image, P1) in (None, key)
                # The failure left nothing stuck: the same amend now succeeds
                # (or, for an erase that got as far as the entry, finds P1 gone).
                node.luks_io = original
                if removed is not None and _volume_key(image, P1) is None:
                    with pytest.raises(QMPError, match="No keyslots match"):
                        await block_amend.run(daemon.nodes, "d0", options, False, _Progress(),
                                                 "x-blockdev-amend")
                else:
                    await block_amend.run(daemon.nodes, "d0", options, False, _Progress(),
                                             "x-blockdev-amend")
                assert (_volume_key(image, P1) == key) == (removed is None)
                assert _volume_key(image, P0) == key
                await daemon.close()
    figures("EIO injected (each read/write/sync of add and erase in turn)", injected)


async def test_file_shrinks_while_open(workdir):
    from qmpd.errors import QMPError

    image = os.path.join(workdir, "s.luks")
    _make_luks(image)
    daemon, node = await _daemon_with_node(image)
    for size in (4096, 600, 0):
        os.truncate(image, size)
        with pytest.raises(QMPError) as err:
            await block_amend.run(daemon.nodes, "d0", ADD_P1, False, _Progress(), "x-blockdev-amend")
        assert err.value.desc and "Internal" not in err.value.desc
        assert os.path.getsize(image) == size  # nothing written past what is left
    assert query.named_block_nodes(daemon.nodes)
    await blockdev.delete(daemon.nodes, "d0")
    await daemon.close()


def test_unreadable_and_odd_files(workdir):
    fifo = os.path.join(workdir, "fifo")
    os.mkfifo(fifo)
    sock = os.path.join(workdir, "q.sock")
    proc = start_qmpd(sock, os.path.join(workdir, "q.log"), "--object", f"secret,id=s0,data={P0}")
    try:
        with QmpClient(sock) as q:
            q.negotiate()
            for path in (fifo, workdir, "/dev/null", "/proc/self/mem", "/nonexistent/x"):
                reply = q.cmd("blockdev-add", {"driver": "luks", "node-name": "x",
                                               "key-secret": "s0",
                                               "file": {"driver": "file", "filename": path}})
                assert "error" in reply and reply["error"]["desc"], (path, reply)
                assert "Internal" not in reply["error"]["desc"], (path, reply)
            assert q.ok("query-version")
    finally:
        stop(proc)


def _slow_open_started(workdir: str):
    """A daemon whose first session is opening an image with 2e9 PBKDF2 iterations."""
    slow_image, ok_image = os.path.join(workdir, "slow.luks"), os.path.join(workdir, "ok.luks")
    _make_luks(slow_image)
    _make_luks(ok_image)
    _forge_iterations(slow_image, 0, HUGE_ITERATIONS)
    sock = os.path.join(workdir, "q.sock")
    proc = start_qmpd(sock, os.path.join(workdir, "q.log"), "--object", f"secret,id=s0,data={P0}")
    slow = QmpClient(sock).negotiate()
    slow.send(b'{"execute": "blockdev-add", "arguments": {"driver": "luks", '
              b'"node-name": "slow", "key-secret": "s0", "file": {"driver": "file", '
              b'"filename": "' + slow_image.encode() + b'"}}}')
    time.sleep(0.3)
    return proc, sock, slow, ok_image


def test_slow_open_does_not_stall_other_block_commands(workdir):
    proc, sock, slow, ok_image = _slow_open_started(workdir)
    try:
        with QmpClient(sock, timeout=1.5) as other:
            other.negotiate()
            reply = other.cmd("blockdev-add", {"driver": "luks", "node-name": "ok",
                                               "key-secret": "s0",
                                               "file": {"driver": "file", "filename": ok_image}})
            assert "return" in reply
    finally:
        proc.kill()
        proc.wait()


def test_sigterm_during_slow_open_exits_promptly(workdir):
    proc, sock, slow, ok_image = _slow_open_started(workdir)
    try:
        proc.terminate()
        proc.wait(3)
    finally:
        proc.kill()
        proc.wait()
