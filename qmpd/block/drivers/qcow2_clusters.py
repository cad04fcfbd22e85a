"""The guest data path of a qcow2 image: L1/L2 mapping, allocation, refcounts.

Theory of operation
===================

Metadata is written through, except L2 entries: every L1 and refcount
change (and every new or copied L2 table) is written to the child at once,
while changed L2 entries stay in the cached table, marked dirty, until
``_sync_l2`` writes them: at ``flush()`` (and FUA), before refcounts drop,
when a dirty table would leave the cache, and at close. The in-memory
tables are the truth for reads; the file lags by the entries of writes
not flushed yet, which a crash may lose (as in QEMU's write-back metadata
cache), and nothing else.

Crash safety comes from ordering alone. The child may lose or reorder any
write issued since its last flush (a write-back cache), so each step that
must be durable before the next one is followed by a flush ("|" below).
A crash between steps can only leak clusters (refcount > 0, unreferenced),
which ``qemu-img check`` reports as leaks, never as errors. ``_sync_l2``
flushes before it writes any entry: the refcounts, the data and COW bytes
and the file length an entry points at are durable before the entry is.

Allocating a cluster (``_allocate``)::

    refcount entries := 1 in existing refcount blocks,
    file extended over the new clusters (a lost data write must not leave
    an L2 entry pointing past the end of the file)     | flush
    (data clusters skip both: see pwrite)

  with a missing refcount block first made (``_new_refblock``)::

    block at the first cluster it describes, counting itself  | flush
    refcount table entry := block                             | flush

  and a full refcount table first grown (``_grow_reftable``, QEMU's
  qcow2_refcount_area)::

    new refcount blocks + new table, past everything the old table
    describes, the blocks counting themselves and the table    | flush
    header (refcount_table_offset, _clusters) in one write     | flush
    old table clusters: refcount -= 1

Writing guest data (``pwrite``)::

    COPIED cluster: written in place (no metadata change, may run outside
    the lock in parallel with reads and other in-place writes)
    otherwise: [L2 table, if missing or shared: allocate | zeroed or copied
               table | flush | L1 entry := table|COPIED  (old table -1)]
               allocate data clusters: refcounts := 1, no flush (the data
               write extends the file; _sync_l2 flushes before the entry)
               write data: guest bytes + COW of the rest of the cluster
               (zeroes, or the old contents of a compressed/shared cluster),
               all of one request encrypted in one pass
               L2 entries := host|COPIED, in memory (dirty)
               if old clusters were replaced: _sync_l2 | flush, then their
               refcounts -1

Zeroing and discard (``pwrite_zeroes``, ``pdiscard``)::

    [shared L2 tables copied first, as above]
    L2 entries := ZERO flag (v3) / 0, in memory
    if clusters are freed: _sync_l2 | flush, then their refcounts -1

Freeing waits until no lockless read or in-place write is in flight, so a
cluster is never reused under a reader. Encryption (LUKS inside qcow2)
uses the host offset for the IV: sector = host byte offset // 512 (QEMU
commit 4652b8f3). Compressed clusters are stored unencrypted, as QEMU does.

Not done here: lazy refcounts are honoured by setting the dirty bit (as
QEMU does) but refcounts stay exact; an image opened with its dirty bit set
needs QEMU's refcount repair and is refused read-write. Extended L2
entries, external data files and backing files are refused; zstd
compressed clusters fail to read with ENOTSUP; snapshots are kept intact
(shared clusters and L2 tables are copied on write) but not managed.
Zeroing an unallocated cluster leaves it unallocated (QEMU sets the zero
flag, allocating L2 tables): without a backing file both read as zeroes.
Freed clusters are not punched in the file.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import sys
import threading
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Protocol

from qmpd.block.datapath import Extent, check_request, waiting_forbidden
from qmpd.block.drivers.qcow2_metadata import (
    COMPAT_LAZY_REFCOUNTS,
    CRYPT_LUKS,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    INCOMPAT_EXTL2,
    MAX_L1_BYTES,
    MAX_REFTABLE_BYTES,
    Qcow2Metadata,
)
from qmpd.errors import QMPError

log = logging.getLogger(__name__)

OFFSET_MASK = 0x00FFFFFFFFFFFE00  # L1E_OFFSET_MASK == L2E_OFFSET_MASK
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
COPIED = 1 << 63
COMPRESSED = 1 << 62
ZERO = 1
SECTOR = 512

UNALLOCATED, ZERO_PLAIN, ZERO_ALLOC, NORMAL, COMPRESSED_CLUSTER = range(5)

# header field offsets
_SIZE_AT, _L1_AT, _REFTABLE_AT, _INCOMPAT_AT = 24, 36, 48, 72

_LITTLE = sys.byteorder == "little"
_TYPECODES = {8: "B", 16: "H", 32: "I", 64: "Q"}


def cluster_type(entry: int) -> int:
    """QEMU's qcow2_get_cluster_type for standard (non-extended) L2 entries."""
    if entry & COMPRESSED:
        return COMPRESSED_CLUSTER
    if entry & ZERO:
        return ZERO_ALLOC if entry & OFFSET_MASK else ZERO_PLAIN
    return NORMAL if entry & OFFSET_MASK else UNALLOCATED


def _be_array(code: str, raw: bytes) -> array:
    table = array(code, raw)
    if _LITTLE and table.itemsize > 1:
        table.byteswap()
    return table


def _be_bytes(table: array) -> bytes:
    if _LITTLE and table.itemsize > 1:
        table = array(table.typecode, table)
        table.byteswap()
    return table.tobytes()


class Child(Protocol):
    def pread(self, offset: int, length: int) -> bytes: ...
    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...
    def flush(self) -> None: ...
    def size(self) -> int: ...
    def truncate(self, size: int) -> None: ...


class Cipher(Protocol):
    def encrypt(self, sector: int, data: bytes) -> bytes: ...
    def decrypt(self, sector: int, data: bytes) -> bytes: ...
    def encrypt_many(self, pieces: list[tuple[int, bytes]]) -> list[bytes]: ...
    def decrypt_many(self, pieces: list[tuple[int, bytes]]) -> list[bytes]: ...


@contextmanager
def _held(lock: threading.Lock) -> Iterator[None]:
    """Release a lock taken by _take_lock."""
    try:
        yield
    finally:
        lock.release()


class Qcow2Corruption(OSError, QMPError):
    """Image corruption found at run time: EIO for the request, QEMU's text."""

    def __init__(self, text: str) -> None:
        OSError.__init__(self, errno.EIO, text)
        self.error_class, self.desc = "GenericError", text

    def __str__(self) -> str:
        return self.desc


class _Refblock:
    """One refcount block: entries of 2**order bits (sub-byte ones LSB first)."""

    __slots__ = ("bits", "entries")

    def __init__(self, order: int, raw: bytes) -> None:
        self.bits = 1 << order
        self.entries: array | bytearray = (
            _be_array(_TYPECODES[self.bits], raw) if self.bits >= 8 else bytearray(raw)
        )

    def get(self, i: int) -> int:
        if self.bits >= 8:
            return self.entries[i]
        bit = i * self.bits
        return (self.entries[bit >> 3] >> (bit & 7)) & ((1 << self.bits) - 1)

    def set(self, i: int, value: int) -> None:
        if self.bits >= 8:
            self.entries[i] = value
            return
        bit, mask = i * self.bits, (1 << self.bits) - 1
        byte = self.entries[bit >> 3] & ~(mask << (bit & 7))
        self.entries[bit >> 3] = byte | (value << (bit & 7))

    def find_zero(self, start: int, count: int) -> int:
        """The first entry >= start that is 0, or -1."""
        if self.bits >= 8:
            try:
                return self.entries.index(0, start)
            except ValueError:
                return -1
        per_byte = 8 // self.bits
        i = start
        while i < count and i % per_byte:  # up to a byte boundary
            if self.get(i) == 0:
                return i
            i += 1
        assert isinstance(self.entries, bytearray)  # sub-byte entries: see __init__
        hit = self.entries.translate(_SUB_BYTE_HAS_ZERO[self.bits]).find(1, i // per_byte)
        if hit < 0:
            return -1
        return next(j for j in range(hit * per_byte, (hit + 1) * per_byte) if self.get(j) == 0)

    def encode(self, first: int, end: int) -> tuple[int, bytes]:
        """(byte offset in the block, bytes) holding entries [first, end)."""
        if self.bits >= 8:
            assert isinstance(self.entries, array)  # 8 bits or more: see __init__
            width = self.bits // 8
            return first * width, _be_bytes(self.entries[first:end])
        lo, hi = first * self.bits // 8, -(-end * self.bits // 8)
        return lo, bytes(self.entries[lo:hi])


def _has_zero_table(bits: int) -> bytes:
    mask = (1 << bits) - 1
    return bytes(int(any((b >> s) & mask == 0 for s in range(0, 8, bits))) for b in range(256))


_SUB_BYTE_HAS_ZERO = {bits: _has_zero_table(bits) for bits in (1, 2, 4)}


class _LRU(OrderedDict):
    def __init__(self, capacity: int, before_evict=None) -> None:
        super().__init__()
        self.capacity = capacity
        self.before_evict = before_evict  # called with the key about to go

    def get_fresh(self, key):
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value

    def put(self, key, value) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.capacity:
            if self.before_evict is not None:
                self.before_evict(next(iter(self)))
            self.popitem(last=False)


class Qcow2Clusters:
    """The synchronous, thread-safe data path of an open qcow2 image."""

    def __init__(
        self,
        child: Child,
        meta: Qcow2Metadata,
        *,
        read_only: bool,
        crypto: Cipher | None = None,
        l2_cache_bytes: int | None = None,
    ) -> None:
        h = meta.header
        if h.incompatible_features & INCOMPAT_EXTL2:
            raise QMPError.generic(
                "qcow2 images with extended L2 entries are not supported by qmpd"
            )
        if (h.crypt_method == CRYPT_LUKS) != (crypto is not None):
            raise QMPError.generic(
                "qcow2: the volume cipher must be given exactly for LUKS-encrypted images"
            )
        if not read_only and h.incompatible_features & INCOMPAT_CORRUPT:
            raise QMPError.generic("qcow2: Image is corrupt; cannot be opened read/write")
        if not read_only and h.incompatible_features & INCOMPAT_DIRTY:
            raise QMPError.generic(
                "qcow2: the image's dirty bit is set (it was not closed cleanly with lazy "
                "refcounts) and its refcounts need a rebuild, which qmpd does not do: repair it "
                "with 'qemu-img check -r all' or open it read-only"
            )
        self.child, self.meta, self.read_only, self.crypto = child, meta, read_only, crypto
        self.request_alignment = SECTOR if crypto else 1
        self.cluster_bits = cb = h.cluster_bits
        self.cluster_size = cs = 1 << cb
        self.l2_bits = cb - 3
        self.refcount_order = h.refcount_order
        self.rb_bits = cb + 3 - h.refcount_order  # log2(entries per refcount block)
        self._max_refcount = (1 << h.refcount_bits) - 1
        self._csize_shift = 62 - (cb - 8)
        self._csize_mask = (1 << (cb - 8)) - 1
        self._coffset_mask = (1 << self._csize_shift) - 1
        self._l1 = _be_array("Q", self._read(h.l1_table_offset, h.l1_size * 8))
        self._reftable = _be_array(
            "Q", self._read(h.refcount_table_offset, h.refcount_table_clusters * cs)
        )
        if l2_cache_bytes is None:  # QEMU 7.2 on Linux: 32 MiB, or what covers the disk
            l2_cache_bytes = min(32 << 20, -(-h.size // (cs // 8)))
        self._l2_cache = _LRU(max(2, l2_cache_bytes // cs), self._before_l2_eviction)
        #: L2 table offset -> indexes changed in memory and not yet written
        #: (written by _sync_l2, after a flush: see the module text)
        self._dirty_l2: dict[int, list[int]] = {}
        self._rb_cache = _LRU(max(4, (256 << 10) // cs))
        self._lock = threading.Lock()  # all metadata, every allocating request
        self._idle = threading.Condition()  # lockless data I/O in flight
        self._in_flight = 0
        self._allocating: set[int] = set()  # guest clusters a write is giving new clusters
        self._allocated = threading.Condition(self._lock)
        self._free_index = 0  # no free cluster below (QEMU's hint)
        self._broken: str | None = None
        self._dirty = bool(h.incompatible_features & INCOMPAT_DIRTY)
        self._tables: dict[int, str] | None = None  # for the overlap check; None: stale

    # -- small helpers ---------------------------------------------------------------
    @property
    def header(self):
        return self.meta.header

    def _read(self, offset: int, length: int) -> bytes:
        data = self.child.pread(offset, length)
        return data + bytes(length - len(data)) if len(data) < length else data

    def _set_header(self, **fields) -> None:
        self.meta.header = replace(self.meta.header, **fields)

    def length(self) -> int:
        return self.header.size

    def _corruption(self, text: str) -> Qcow2Corruption:
        """QEMU's qcow2_signal_corruption (fatal): mark the image, stop serving it."""
        if self._broken is None:
            self._broken = text
            if self.read_only or self.header.version < 3:
                log.error(
                    "qcow2: Image is corrupt: %s; further non-fatal corruption events "
                    "will be suppressed",
                    text,
                )
            else:
                log.error(
                    "qcow2: Marking image as corrupt: %s; further corruption events "
                    "will be suppressed",
                    text,
                )
                flags = self.header.incompatible_features | INCOMPAT_CORRUPT
                try:
                    self.child.pwrite(_INCOMPAT_AT, struct.pack(">Q", flags))
                    self.child.flush()
                    self._set_header(incompatible_features=flags)
                except OSError as err:
                    log.error("qcow2: could not set the corrupt bit: %s", err)
        return Qcow2Corruption(text)

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise Qcow2Corruption(f"qcow2 image is unusable after a corruption: {self._broken}")

    def _check_write(self, offset: int, length: int) -> None:
        check_request(offset, length, self.header.size)
        if self.read_only:
            raise OSError(errno.EPERM, "Block node is read-only")
        if (offset | length) % self.request_alignment:
            raise OSError(errno.EINVAL, "request not aligned to the encryption sector size")

    def _begin_io(self) -> None:
        with self._idle:
            self._in_flight += 1

    def _end_io(self) -> None:
        with self._idle:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.notify_all()

    # -- L1 / L2 -----------------------------------------------------------------------
    def _l2_offset(self, l1i: int) -> int:
        entry = self._l1[l1i]
        offset = entry & OFFSET_MASK
        if offset % self.cluster_size:
            raise self._corruption(f"L2 table offset {offset:#x} unaligned (L1 index: {l1i:#x})")
        return offset

    def _l2_table(self, offset: int) -> array:
        table = self._l2_cache.get_fresh(offset)
        if table is None:
            cache = self._l2_cache
            if (
                waiting_forbidden()
                and len(cache) >= cache.capacity
                and next(iter(cache)) in self._dirty_l2
            ):
                # loading it would write back the oldest table: flushes, not for the loop
                raise BlockingIOError(errno.EAGAIN, "L2 cache full of unwritten entries")
            table = _be_array("Q", self._read(offset, self.cluster_size))
            self._l2_cache.put(offset, table)
        return table

    def _entry(self, cluster: int) -> int:
        """The L2 entry of guest cluster ``cluster`` (0 without an L2 table)."""
        l1i, l2i = cluster >> self.l2_bits, cluster & ((1 << self.l2_bits) - 1)
        l2 = self._l2_offset(l1i)
        if not l2:
            return 0
        entry = self._l2_table(l2)[l2i]
        if (
            cluster_type(entry) in (NORMAL, ZERO_ALLOC)
            and (entry & OFFSET_MASK) % self.cluster_size
        ):
            raise self._corruption(
                f"Cluster allocation offset {entry & OFFSET_MASK:#x} unaligned "
                f"(L2 offset: {l2:#x}, L2 index: {l2i:#x})"
            )
        return entry

    def _pieces(self, offset: int, length: int):
        """(guest cluster, offset in cluster, position in request, bytes, L2 entry)."""
        cs, pos = self.cluster_size, 0
        while pos < length:
            cluster, inside = divmod(offset + pos, cs)
            n = min(cs - inside, length - pos)
            yield cluster, inside, pos, n, self._entry(cluster)
            pos += n

    def _write_l1(self, indexes: list[int]) -> None:
        self._tables = None
        for first, end in _spans(indexes):
            self.child.pwrite(
                self.header.l1_table_offset + first * 8, _be_bytes(self._l1[first:end])
            )

    def _set_l2(self, updates: dict[int, int]) -> list[int]:
        """Guest cluster -> new L2 entry (tables COPIED), in memory: written by
        the next _sync_l2. Returns the old entries."""
        old = []
        by_table: dict[int, list[int]] = {}
        for cluster in sorted(updates):
            by_table.setdefault(cluster >> self.l2_bits, []).append(cluster)
        for l1i, clusters in by_table.items():
            l2 = self._l2_offset(l1i)
            table = self._l2_table(l2)
            indexes = [c & ((1 << self.l2_bits) - 1) for c in clusters]
            for c, i in zip(clusters, indexes, strict=False):
                old.append(table[i])
                table[i] = updates[c]
            self._dirty_l2.setdefault(l2, []).extend(indexes)
        return old

    def _sync_l2(self) -> None:
        """Write the L2 entries changed in memory, after a flush: what they
        point at (refcounts, data, COW bytes, the file's length) is durable
        before any of them is on disk."""
        if not self._dirty_l2:
            return
        self.child.flush()
        for l2, indexes in list(self._dirty_l2.items()):
            table = self._l2_cache[l2]
            for first, end in _spans(sorted(set(indexes))):
                self.child.pwrite(l2 + first * 8, _be_bytes(table[first:end]))
            del self._dirty_l2[l2]

    def _before_l2_eviction(self, l2: int) -> None:
        if l2 in self._dirty_l2:
            self._sync_l2()

    def _sync_before_free(self) -> None:
        """Before refcounts drop: the L2 changes that removed the references are
        durable, and no lockless I/O still targets the clusters."""
        self._sync_l2()
        self.child.flush()
        self._wait_idle()

    def _prepare_l2(
        self, l1_indexes, hosts: list[int] | None = None, *, existing_only: bool = False
    ) -> None:
        """Give every L1 index an L2 table of its own (COPIED): new or copied.

        ``hosts``: clusters already allocated for the tables (else allocated
        here). ``existing_only``: only copy shared tables, create none.
        """
        need = self._tables_needed(l1_indexes, existing_only=existing_only)
        if not need:
            return
        if hosts is None:
            hosts = self._allocate(len(need))
        replaced = []
        for l1i, host in zip(need, hosts, strict=False):
            old = self._l2_offset(l1i)
            table = array("Q", self._l2_table(old)) if old else array("Q", bytes(self.cluster_size))
            self._check_overlap(host, self.cluster_size)
            self.child.pwrite(host, _be_bytes(table))
            self._l2_cache.put(host, table)
            if old:
                replaced.append(old)
                self._l2_cache.pop(old, None)
                self._dirty_l2.pop(old, None)
        self.child.flush()
        for l1i, host in zip(need, hosts, strict=False):
            self._l1[l1i] = host | COPIED
        self._write_l1(need)
        if replaced:
            self.child.flush()
            self._wait_idle()
            for old in replaced:
                self._decref(old >> self.cluster_bits, 1)

    def _tables_needed(self, l1_indexes, *, existing_only: bool = False) -> list[int]:
        need = []
        for l1i in sorted(set(l1_indexes)):
            entry = self._l1[l1i]
            has = self._l2_offset(l1i) != 0
            if (not has and not existing_only) or (has and not entry & COPIED):
                need.append(l1i)
        return need

    # -- refcounts ---------------------------------------------------------------------
    def _refblock(self, index: int) -> _Refblock | None:
        offset = self._reftable[index] & REFT_OFFSET_MASK if index < len(self._reftable) else 0
        if not offset:
            return None
        if offset % self.cluster_size:
            raise self._corruption(
                f"Refblock offset {offset:#x} unaligned (reftable index: {index:#x})"
            )
        block = self._rb_cache.get_fresh(offset)
        if block is None:
            block = _Refblock(self.refcount_order, self._read(offset, self.cluster_size))
            self._rb_cache.put(offset, block)
        return block

    def _refcount(self, cluster: int) -> int:
        block = self._refblock(cluster >> self.rb_bits)
        return block.get(cluster & ((1 << self.rb_bits) - 1)) if block else 0

    def _write_refcounts(self, block_index: int, block: _Refblock, first: int, end: int) -> None:
        at, data = block.encode(first, end)
        self.child.pwrite((self._reftable[block_index] & REFT_OFFSET_MASK) + at, data)

    def _find_free(self, cluster: int) -> int:
        per_block = 1 << self.rb_bits
        while True:
            index = cluster >> self.rb_bits
            block = self._refblock(index)
            if block is None:
                return cluster  # not described: refcount 0
            hit = block.find_zero(cluster & (per_block - 1), per_block)
            if hit >= 0:
                return (index << self.rb_bits) + hit
            cluster = (index + 1) << self.rb_bits

    def _find_run(self, cluster: int, count: int) -> int:
        """The first run of ``count`` free clusters at or after ``cluster``."""
        start = self._find_free(cluster)
        while True:
            busy = next((c for c in range(start, start + count) if self._refcount(c)), None)
            if busy is None:
                return start
            start = self._find_free(busy + 1)

    def _allocate(
        self, count: int, *, contiguous: bool = False, cover: bool = True, flush: bool = True
    ) -> list[int]:
        """Host offsets of ``count`` new clusters, their refcounts 1 and flushed.

        ``cover``: the file is extended over them (else the caller's write
        does, as QEMU's L1 table growth writes just the table). ``flush``
        False: the caller flushes before anything on disk points at them
        (data clusters: _sync_l2)."""
        if not count:
            return []
        found: list[int] = []
        mask = (1 << self.rb_bits) - 1
        while len(found) < count:
            want = count - len(found)
            start = (
                self._find_run(self._free_index, want)
                if contiguous
                else self._find_free(self._free_index)
            )
            missing = next(
                (
                    b
                    for b in range(
                        start >> self.rb_bits,
                        ((start + (want if contiguous else 1) - 1) >> self.rb_bits) + 1,
                    )
                    if self._refblock(b) is None
                ),
                None,
            )
            if missing is not None:
                self._new_refblock(missing)
                continue
            if contiguous:
                run = want
            else:
                block = self._refblock(start >> self.rb_bits)
                assert block is not None  # no refblock is missing (above)
                run, i = 1, start & mask
                while run < want and i + run <= mask and block.get(i + run) == 0:
                    run += 1
            self._set_refcounts(start, run, 1)
            if start <= self._free_index:
                self._free_index = start + run
            found.extend(range(start, start + run))
        end = (max(found) + 1) << self.cluster_bits
        if cover and end > self.child.size():
            # the file covers every cluster before anything can reference it
            self.child.truncate(end)
        if flush:
            self.child.flush()
        return [c << self.cluster_bits for c in found]

    def _set_refcounts(self, start: int, count: int, value: int) -> None:
        mask = (1 << self.rb_bits) - 1
        cluster = start
        while cluster < start + count:
            index = cluster >> self.rb_bits
            block = self._refblock(index)
            assert block is not None  # _allocate() made the refblocks first
            first = cluster & mask
            end = min(mask + 1, first + start + count - cluster)
            for i in range(first, end):
                block.set(i, value)
            self._write_refcounts(index, block, first, end)
            cluster += end - first

    def _decref(self, start: int, count: int) -> None:
        """Refcount -1 for clusters [start, start+count) (after their last reference
        is gone on disk). An underflow is logged and skipped, as QEMU does."""
        mask = (1 << self.rb_bits) - 1
        for cluster in range(start, start + count):
            index = cluster >> self.rb_bits
            block = self._refblock(index)
            value = block.get(cluster & mask) if block else 0
            if value == 0:
                log.error(
                    "qcow2_free_clusters failed: refcount underflow at cluster %#x",
                    cluster << self.cluster_bits,
                )
                continue
            assert block is not None  # else value is 0
            block.set(cluster & mask, value - 1)
            self._write_refcounts(index, block, cluster & mask, (cluster & mask) + 1)
            if value == 1:
                self._free_index = min(self._free_index, cluster)

    def _free_entry(self, entry: int) -> None:
        """Drop the reference an old L2 entry held (qcow2_free_any_cluster)."""
        kind = cluster_type(entry)
        if kind == COMPRESSED_CLUSTER:
            offset, size = self._compressed_extent(entry)
            first = offset >> self.cluster_bits
            self._decref(first, ((offset + size - 1) >> self.cluster_bits) - first + 1)
        elif kind in (NORMAL, ZERO_ALLOC):
            self._decref((entry & OFFSET_MASK) >> self.cluster_bits, 1)

    def _wait_idle(self) -> None:
        """Before clusters may be reused: no lockless I/O may still target them."""
        with self._idle:
            self._idle.wait_for(lambda: self._in_flight == 0)

    def _new_refblock(self, index: int) -> None:
        """Create the missing refcount block ``index``."""
        if index >= len(self._reftable):
            self._grow_reftable(index)
            return
        # Nothing in the block's range is allocated (no block counts it), so the
        # block goes to the first cluster it describes and counts itself.
        cluster = index << self.rb_bits
        block = _Refblock(self.refcount_order, bytes(self.cluster_size))
        block.set(0, 1)
        host = cluster << self.cluster_bits
        self.child.pwrite(host, block.encode(0, 1 << self.rb_bits)[1])
        self.child.flush()
        self._reftable[index] = host
        self._tables = None
        self.child.pwrite(self.header.refcount_table_offset + index * 8, struct.pack(">Q", host))
        self.child.flush()
        self._rb_cache.put(host, block)

    def _grow_reftable(self, need: int) -> None:
        """A bigger refcount table (and the blocks describing it) past the old coverage."""
        cs, old_entries = self.cluster_size, len(self._reftable)
        start = old_entries << self.rb_bits  # nothing from here on is allocated
        blocks, table_clusters = 1, 1
        while True:
            last = (start + blocks + table_clusters - 1) >> self.rb_bits
            entries = max(need + 1, last + 1, old_entries + old_entries // 2)
            wanted = (last - (start >> self.rb_bits) + 1, -(-entries * 8 // cs))
            if wanted == (blocks, table_clusters):
                break
            blocks, table_clusters = wanted
        if table_clusters * cs > MAX_REFTABLE_BYTES:
            raise OSError(errno.EFBIG, "qcow2: the refcount table would be too large")
        first_block = start >> self.rb_bits
        table = array("Q", self._reftable) + array(
            "Q", bytes((table_clusters * cs // 8 - old_entries) * 8)
        )
        per_block = 1 << self.rb_bits
        new_blocks = []
        for j in range(blocks):
            index = first_block + j
            block = _Refblock(self.refcount_order, bytes(cs))
            lo, hi = (
                max(start, index * per_block),
                min(start + blocks + table_clusters, (index + 1) * per_block),
            )
            for cluster in range(lo, hi):
                block.set(cluster - index * per_block, 1)
            host = (start + j) << self.cluster_bits
            self.child.pwrite(host, block.encode(0, per_block)[1])
            table[index] = host
            new_blocks.append((host, block))
        table_offset = (start + blocks) << self.cluster_bits
        self.child.pwrite(table_offset, _be_bytes(table))
        self.child.flush()
        self.child.pwrite(_REFTABLE_AT, struct.pack(">QI", table_offset, table_clusters))
        self.child.flush()
        old_offset, old_clusters = (
            self.header.refcount_table_offset,
            self.header.refcount_table_clusters,
        )
        self._reftable, self._tables = table, None
        self._set_header(refcount_table_offset=table_offset, refcount_table_clusters=table_clusters)
        for host, block in new_blocks:
            self._rb_cache.put(host, block)
        self._decref(old_offset >> self.cluster_bits, old_clusters)

    # -- checks on data writes -------------------------------------------------------
    def _check_overlap(self, host: int, length: int) -> None:
        """QEMU's qcow2_pre_write_overlap_check for the cached metadata."""
        h, cs, end = self.header, self.cluster_size, host + length
        ranges = [
            ("qcow2_header", 0, cs),
            ("active L1 table", h.l1_table_offset, h.l1_size * 8),
            ("refcount table", h.refcount_table_offset, h.refcount_table_clusters * cs),
        ]
        if self.meta.crypto_header:
            ranges.append(("LUKS header", *self.meta.crypto_header))
        for name, start, size in ranges:
            if size and host < start + size and start < end:
                raise self._corruption(
                    f"Preventing invalid write on metadata (overlaps with {name})"
                )
        if self._tables is None:  # cluster index -> what table it holds
            self._tables = {
                (e & OFFSET_MASK) >> self.cluster_bits: "active L2 table"
                for e in self._l1
                if e & OFFSET_MASK
            }
            self._tables.update(
                {
                    (e & REFT_OFFSET_MASK) >> self.cluster_bits: "refcount block"
                    for e in self._reftable
                    if e & REFT_OFFSET_MASK
                }
            )
        for cluster in range(host >> self.cluster_bits, ((end - 1) >> self.cluster_bits) + 1):
            if cluster in self._tables:
                raise self._corruption(
                    f"Preventing invalid write on metadata (overlaps with {self._tables[cluster]})"
                )

    def _mark_dirty(self) -> None:
        """QEMU's qcow2_mark_dirty: lazy-refcount images are dirty while written."""
        h = self.header
        if self._dirty or h.version < 3 or not h.compatible_features & COMPAT_LAZY_REFCOUNTS:
            return
        flags = h.incompatible_features | INCOMPAT_DIRTY
        self.child.pwrite(_INCOMPAT_AT, struct.pack(">Q", flags))
        self.child.flush()
        self._set_header(incompatible_features=flags)
        self._dirty = True

    # -- data ---------------------------------------------------------------------------
    def _compressed_extent(self, entry: int) -> tuple[int, int]:
        offset = entry & self._coffset_mask
        sectors = ((entry >> self._csize_shift) & self._csize_mask) + 1
        return offset, sectors * SECTOR - (offset & (SECTOR - 1))

    def _decompress(self, entry: int) -> bytes:
        if self.header.compression_type != 0:
            raise OSError(
                errno.ENOTSUP, "qcow2: zstd-compressed clusters are not supported by qmpd"
            )
        offset, size = self._compressed_extent(entry)
        try:
            out = zlib.decompressobj(-15).decompress(
                self.child.pread(offset, size), self.cluster_size
            )
        except zlib.error:
            out = b""
        if len(out) != self.cluster_size:
            raise OSError(errno.EIO, "qcow2: a compressed cluster does not decompress")
        return out

    def _read_host(self, host: int, length: int) -> bytes:
        data = self._read(host, length)
        return self.crypto.decrypt(host // SECTOR, data) if self.crypto else data

    def _write_hosts(self, writes: list[tuple[int, bytes | bytearray | memoryview]]) -> None:
        """Guest data to host offsets: pieces that follow each other on the
        host go in one write, and everything is encrypted in one pass (a
        1 MiB write over 64 KiB clusters: one pwrite, one cipher call)."""
        runs: list[tuple[int, list]] = []
        end = -1
        for host, data in writes:
            if host == end:
                runs[-1][1].append(data)
            else:
                runs.append((host, [data]))
            end = host + len(data)
        joined = [(host, parts[0] if len(parts) == 1 else b"".join(parts)) for host, parts in runs]
        if self.crypto:
            encrypted = self.crypto.encrypt_many(
                [(host // SECTOR, bytes(data)) for host, data in joined]
            )
            joined = [(host, data) for (host, _), data in zip(joined, encrypted, strict=True)]
        for host, data in joined:
            self.child.pwrite(host, data)

    def _take_lock(self) -> None:
        """The metadata lock; on the event loop (no waiting) only if it is free:
        a thread may hold it across I/O."""
        if not waiting_forbidden():
            self._lock.acquire()
        elif not self._lock.acquire(blocking=False):
            raise BlockingIOError(errno.EAGAIN, "qcow2 metadata busy")

    def pread(self, offset: int, length: int) -> bytes:
        return self.pread_many(((offset, length),))[0]

    def pread_many(self, ranges) -> list[bytes]:
        """Reads of guest ranges: the mapping of all under one lock, then the
        data outside it, decrypted in one pass."""
        for offset, length in ranges:
            check_request(offset, length, self.header.size)
            if (offset | length) % self.request_alignment:
                raise OSError(errno.EINVAL, "request not aligned to the encryption sector size")
        self._take_lock()
        try:
            self._check_usable()
            plans = [list(self._pieces(offset, length)) for offset, length in ranges]
            self._begin_io()
        finally:
            self._lock.release()
        try:
            return self._read_mapped(ranges, plans)
        finally:
            self._end_io()

    def _read_mapped(self, ranges, plans) -> list[bytes]:
        # A request that one run of clusters covers gets the decrypted run
        # itself; the others a zeroed buffer the runs are copied into (made
        # only for them: zeroing a megabyte costs as much as reading it).
        outs: list[bytes | bytearray] = []
        runs: list[list[int]] = []  # [request, host, position, bytes] of normal clusters
        for i, ((_, length), pieces) in enumerate(zip(ranges, plans, strict=True)):
            whole = (
                len(pieces) > 0
                and cluster_type(pieces[0][4]) == NORMAL
                and all(
                    cluster_type(p[4]) == NORMAL
                    and (p[4] & OFFSET_MASK) + p[1]
                    == (pieces[0][4] & OFFSET_MASK) + pieces[0][1] + p[2]
                    for p in pieces
                )
            )
            out = b"" if whole else bytearray(length)
            outs.append(out)
            for _, inside, pos, n, entry in pieces:
                kind = cluster_type(entry)
                if kind == NORMAL:
                    host = (entry & OFFSET_MASK) + inside
                    last = runs[-1] if runs else None
                    if (
                        last
                        and last[0] == i
                        and last[1] + last[3] == host
                        and last[2] + last[3] == pos
                    ):
                        last[3] += n
                    else:
                        runs.append([i, host, pos, n])
                elif kind == COMPRESSED_CLUSTER:
                    if waiting_forbidden():  # inflating is CPU work for a thread
                        raise BlockingIOError(errno.EAGAIN, "compressed cluster")
                    assert isinstance(out, bytearray)  # not whole: a piece is compressed
                    out[pos : pos + n] = self._decompress(entry)[inside : inside + n]
        data = [self._read(host, n) for _, host, _, n in runs]
        if self.crypto:
            data = self.crypto.decrypt_many(
                [(run[1] // SECTOR, piece) for run, piece in zip(runs, data, strict=True)]
            )
        for (i, _, pos, n), piece in zip(runs, data, strict=True):
            out = outs[i]
            if isinstance(out, bytearray):
                out[pos : pos + n] = piece
            else:
                outs[i] = piece  # one run covers the request
        return [bytes(out) for out in outs]

    def pwrite(
        self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False
    ) -> None:
        data = memoryview(data).cast("B")
        self._check_write(offset, len(data))
        if not data:
            return
        with self._lock:
            self._check_usable()
            while True:
                pieces = list(self._pieces(offset, len(data)))
                if not self._allocating or not any(p[0] in self._allocating for p in pieces):
                    break
                self._allocated.wait()  # an earlier write is giving them clusters
            if all(cluster_type(e) == NORMAL and e & COPIED for *_, e in pieces):
                for _, inside, _, n, entry in pieces:
                    self._check_overlap((entry & OFFSET_MASK) + inside, n)
                writes: list[tuple[int, bytes | bytearray | memoryview]] = [
                    ((entry & OFFSET_MASK) + inside, data[pos : pos + n])
                    for _, inside, pos, n, entry in pieces
                ]
                updates: dict[int, int] = {}
            else:
                self._mark_dirty()
                writes, updates = self._plan_allocating(data, pieces)
                self._allocating.update(updates)
            self._begin_io()
        try:
            self._write_hosts(writes)  # encrypted and written outside the lock
        except BaseException:
            self._end_io()
            if updates:  # the new clusters leak, as after a crash
                with self._lock:
                    self._allocating.difference_update(updates)
                    self._allocated.notify_all()
            raise
        self._end_io()
        if updates:
            with self._lock:
                self._allocating.difference_update(updates)
                self._allocated.notify_all()
                self._map_allocated(updates)
        if fua:
            self.flush()

    def _wait_allocations(self, clusters=None) -> None:
        """(The lock held) until no write is giving any of these guest clusters
        (None: any cluster) new host clusters."""
        while self._allocating and (clusters is None or not self._allocating.isdisjoint(clusters)):
            self._allocated.wait()

    def _plan_allocating(
        self, data: memoryview, pieces: list
    ) -> tuple[list[tuple[int, bytes | bytearray | memoryview]], dict[int, int]]:
        """A write needing new clusters (or L2 tables), the order in the module
        text: tables and clusters allocated here, under the lock; the caller
        writes the data outside it (the guest clusters marked as allocating,
        so no other request changes them meanwhile), then _map_allocated."""
        cs = self.cluster_size
        moving = [p for p in pieces if not (cluster_type(p[4]) == NORMAL and p[4] & COPIED)]
        tables = self._tables_needed(p[0] >> self.l2_bits for p in moving)
        fresh = [p for p in moving if not (cluster_type(p[4]) == ZERO_ALLOC and p[4] & COPIED)]
        self._prepare_l2([p[0] >> self.l2_bits for p in moving], self._allocate(len(tables)))
        # Data clusters: no flush and no file extension here; the data write
        # extends the file, and _sync_l2 flushes before their L2 entries go out.
        host_of = dict(
            zip(
                (p[0] for p in fresh),
                self._allocate(len(fresh), cover=False, flush=False),
                strict=False,
            )
        )
        updates: dict[int, int] = {}
        writes: list[tuple[int, bytes | bytearray | memoryview]] = []
        for cluster, inside, pos, n, entry in pieces:
            kind = cluster_type(entry)
            if kind == NORMAL and entry & COPIED:
                self._check_overlap((entry & OFFSET_MASK) + inside, n)
                writes.append(((entry & OFFSET_MASK) + inside, data[pos : pos + n]))
                continue
            host = host_of.get(cluster, entry & OFFSET_MASK)
            in_disk = min(cs, self.header.size - cluster * cs)
            buffer: bytes | bytearray | memoryview
            if inside == 0 and n == cs:
                buffer = data[pos : pos + n]
            elif inside == 0 and n >= in_disk:
                buffer = bytearray(data[pos : pos + n]) + bytes(cs - n)
            else:
                if kind == COMPRESSED_CLUSTER:
                    buffer = bytearray(self._decompress(entry))
                elif kind == NORMAL:  # shared: copy the old contents
                    buffer = bytearray(self._read_host(entry & OFFSET_MASK, cs))
                else:
                    buffer = bytearray(cs)
                buffer[inside : inside + n] = data[pos : pos + n]
            self._check_overlap(host, cs)
            writes.append((host, buffer))
            updates[cluster] = host | COPIED
        return writes, updates

    def _map_allocated(self, updates: dict[int, int]) -> None:
        """(The lock held) the written clusters into the L2 tables; the clusters
        they replaced freed once that is durable."""
        old = self._set_l2(updates)
        replaced = [
            e
            for e in old
            if cluster_type(e) in (NORMAL, COMPRESSED_CLUSTER)
            or (cluster_type(e) == ZERO_ALLOC and not e & COPIED)
        ]
        if replaced:
            self._sync_before_free()
            for entry in replaced:
                self._free_entry(entry)

    def _whole_clusters(self, offset: int, length: int) -> tuple[int, int]:
        """Clusters wholly inside the range (the disk's last partial cluster counts
        when the range reaches the end of the disk)."""
        cs, end = self.cluster_size, offset + length
        first = -(-offset // cs)
        last = -(-end // cs) if end == self.header.size else end // cs
        return first, max(first, last)

    def _update_entries(self, first: int, last: int, new_entry) -> None:
        """Set L2 entries of clusters [first, last) to new_entry(old) (None: keep),
        then free the old clusters new_entry says to free."""
        updates: dict[int, int] = {}
        frees = []
        for cluster in range(first, last):
            entry = self._entry(cluster)
            change = new_entry(entry)
            if change is not None and change[0] != entry:
                updates[cluster] = change[0]
                if change[1]:
                    frees.append(entry)
        if not updates:
            return
        self._mark_dirty()
        self._prepare_l2([c >> self.l2_bits for c in updates], existing_only=True)
        self._set_l2(updates)
        if frees:
            self._sync_before_free()
            for entry in frees:
                self._free_entry(entry)

    def pwrite_zeroes(
        self,
        offset: int,
        length: int,
        *,
        may_unmap: bool = False,
        fua: bool = False,
        fast: bool = False,
    ) -> None:
        self._check_write(offset, length)
        cs, v3 = self.cluster_size, self.header.version >= 3
        first, last = self._whole_clusters(offset, length)
        end = offset + length
        parts = (
            [(offset, length)]
            if first == last
            else [(offset, first * cs - offset), (last * cs, end - last * cs)]
        )
        with self._lock:
            self._check_usable()
            self._wait_allocations(range(offset // cs, -(-end // cs)))
            # bytes outside whole clusters, in clusters that do not read as zeroes
            partial = [
                (cluster * cs + inside, n)
                for p_off, p_len in parts
                if p_len > 0
                for cluster, inside, _, n, entry in self._pieces(p_off, p_len)
                if not _reads_zero(entry)
            ]
            data_clusters = (
                []
                if v3 or may_unmap
                else [c for c in range(first, last) if not _reads_zero(self._entry(c))]
            )
            if fast and (partial or data_clusters):
                raise OSError(errno.ENOTSUP, "zeroing this range needs writing zeroes")

            def zeroize(entry: int):
                kind = cluster_type(entry)
                if kind in (UNALLOCATED, ZERO_PLAIN):
                    return None  # reads as zeroes already (no backing)
                if not v3:
                    return (0, True) if may_unmap else None
                unmap = kind == COMPRESSED_CLUSTER or (may_unmap and kind in (NORMAL, ZERO_ALLOC))
                return ((0 if unmap else entry) | ZERO, unmap)

            self._update_entries(first, last, zeroize)
        for cluster in data_clusters:
            start = cluster * cs
            self.pwrite(start, bytes(min(cs, self.header.size - start)))
        for p_off, p_len in partial:
            self.pwrite(p_off, bytes(p_len))
        if fua:
            self.flush()

    def pdiscard(self, offset: int, length: int) -> None:
        """QEMU's discard_in_l2_slice without a backing file; partial clusters ignored."""
        self._check_write(offset, length)
        first, last = self._whole_clusters(offset, length)
        v3 = self.header.version >= 3

        def discard(entry: int):
            if cluster_type(entry) in (UNALLOCATED, ZERO_PLAIN):
                return None
            return (ZERO if v3 else 0, True)

        with self._lock:
            self._check_usable()
            self._wait_allocations(range(first, last))
            self._update_entries(first, last, discard)

    def flush(self) -> None:
        """Every write before is durable: the L2 entries held in memory go out
        (after a flush, _sync_l2), then one more flush."""
        with self._lock:
            self._sync_l2()
        self.child.flush()

    def block_status(self, offset: int, length: int) -> list[Extent]:
        check_request(offset, length, self.header.size)
        extents: list[Extent] = []
        cs, span_bits = self.cluster_size, self.l2_bits + self.cluster_bits
        pos, end = offset, offset + length
        self._take_lock()
        with _held(self._lock):
            self._check_usable()
            while pos < end:
                if not self._l2_offset(pos >> span_bits):  # no L2 table: a whole span
                    n = min(end, ((pos >> span_bits) + 1) << span_bits) - pos
                    status = (False, True, False)
                else:
                    n = min(end - pos, cs - pos % cs)
                    kind = cluster_type(self._entry(pos // cs))
                    status = {
                        UNALLOCATED: (False, True, False),
                        ZERO_PLAIN: (False, True, True),
                        ZERO_ALLOC: (False, True, True),
                    }.get(kind, (True, False, True))
                if (
                    extents
                    and (extents[-1].data, extents[-1].zero, extents[-1].allocated) == status
                ):
                    extents[-1] = replace(extents[-1], length=extents[-1].length + n)
                else:
                    extents.append(Extent(n, *status))
                pos += n
        return extents

    def resize(self, new_size: int) -> None:
        """block_resize: grow the L1 table if needed (qcow2_grow_l1_table), or
        shrink (:meth:`_shrink`), then the size."""
        if self.read_only:
            raise OSError(errno.EPERM, "Block node is read-only")
        if new_size % SECTOR:
            raise OSError(errno.EINVAL, "Image size must be a multiple of 512 bytes")
        with self._lock:
            self._check_usable()
            self._wait_allocations()
            h = self.header
            span = self.cluster_size << self.l2_bits
            l1_size = -(-new_size // span)
            if new_size < h.size:
                self._shrink(new_size)
            elif l1_size > h.l1_size:
                if l1_size * 8 > MAX_L1_BYTES:
                    raise OSError(errno.EFBIG, "qcow2: the L1 table would be too large")
                self._mark_dirty()
                clusters = -(-l1_size * 8 // self.cluster_size)
                host = self._allocate(clusters, contiguous=True, cover=False)[0]
                table = array("Q", self._l1) + array("Q", bytes((l1_size - h.l1_size) * 8))
                self.child.pwrite(host, _be_bytes(table))  # the entries only, as QEMU
                self.child.flush()
                self.child.pwrite(_L1_AT, struct.pack(">IQ", l1_size, host))
                self.child.flush()
                old, old_clusters = h.l1_table_offset, -(-h.l1_size * 8 // self.cluster_size)
                self._l1, self._tables = table, None
                self._set_header(l1_size=l1_size, l1_table_offset=host)
                if old_clusters and old:
                    self._decref(old >> self.cluster_bits, old_clusters)
            self.child.pwrite(_SIZE_AT, struct.pack(">Q", new_size))
            self.child.flush()
            self._set_header(size=new_size)

    def _shrink(self, new_size: int) -> None:
        """qcow2_co_truncate's shrink, in its order (the lock held).

        The guest clusters from the first one wholly past the new end are
        discarded for good (entries := 0, clusters freed, as QEMU's full
        discard: the bytes of a last partial cluster stay and read again
        after a later grow, as in QEMU); the L2 tables past the new L1 size
        are dropped from the L1 table (which keeps its size) and freed; the
        file is cut after its last cluster in use (a failure there is only
        logged, as QEMU warns). Every step is durable before the next frees,
        so a crash leaks at most.
        """
        cs, per_l2 = self.cluster_size, 1 << self.l2_bits
        first, last = -(-new_size // cs), -(-self.header.size // cs)
        keep = -(-new_size // (cs * per_l2))
        if first < min(last, keep * per_l2) and not self._l2_offset(keep - 1):
            # QEMU's discard looks the range up through get_cluster_table,
            # which gives the last L1 entry kept an (empty) table: so here
            self._prepare_l2([keep - 1])
        for l1i in range(first // per_l2, min(len(self._l1), -(-last // per_l2))):
            if self._l2_offset(l1i):
                self._update_entries(
                    max(first, l1i * per_l2), min(last, (l1i + 1) * per_l2), lambda entry: (0, True)
                )
        drop = [i for i in range(keep, len(self._l1)) if self._l1[i] & OFFSET_MASK]
        if drop:
            self._mark_dirty()
            self._sync_l2()
            tables = [self._l1[i] & OFFSET_MASK for i in drop]
            for i in drop:
                self._l1[i] = 0
            self._write_l1(drop)
            self.child.flush()
            self._wait_idle()
            for table in tables:
                self._l2_cache.pop(table, None)
                self._dirty_l2.pop(table, None)
                self._decref(table >> self.cluster_bits, 1)
        self.child.flush()
        end = self.child.size()
        used = (end - 1) >> self.cluster_bits
        while used >= 0 and not self._refcount(used):
            used -= 1
        if (used + 1) * cs < end:
            try:
                self.child.truncate((used + 1) * cs)
            except OSError as err:
                log.warning(
                    "Failed to truncate the tail of the image: %s",
                    os.strerror(err.errno or errno.EIO),
                )

    def close(self) -> None:
        """Flush, and clear the dirty bit this node set (QEMU's qcow2_mark_clean)."""
        if self.read_only:
            return
        with self._lock:
            self._sync_l2()
            self.child.flush()
            h = self.header
            if self._dirty and self._broken is None:
                flags = h.incompatible_features & ~INCOMPAT_DIRTY
                self.child.pwrite(_INCOMPAT_AT, struct.pack(">Q", flags))
                self.child.flush()
                self._set_header(incompatible_features=flags)
                self._dirty = False


def _reads_zero(entry: int) -> bool:
    return cluster_type(entry) in (UNALLOCATED, ZERO_PLAIN, ZERO_ALLOC)


def _spans(indexes: list[int]):
    """Runs [first, end) of consecutive sorted indexes."""
    run = None
    for i in sorted(indexes):
        if run and i == run[1]:
            run[1] += 1
        elif run and i < run[1]:
            continue
        else:
            if run:
                yield tuple(run)
            run = [i, i + 1]
    if run:
        yield tuple(run)
