"""Which unexpected member QEMU names first.

When a JSON object has several members the schema does not know, QEMU 7.2
reports only one: the first key of a GLib hash table (``g_str_hash``) that
held the object's keys and lost each key as the visitor consumed it. The
keys went in in the iteration order of QEMU's QDict (512 buckets, ``tdb_hash``,
newest first within a bucket), so the answer depends on the hash functions,
the table's probing and its resizes. This module replays all of that, so the
reply names the same member QEMU's would; it only runs on the error path.

Model of GLib 2.74 ``GHashTable`` (open addressing, quadratic probing,
``index = (hash * 11) % prime_mod[shift]``, tombstones on removal, resize when
more than 15/16 occupied or less than 1/4 used).
"""

from __future__ import annotations

_QDICT_BUCKETS = 512
_MIN_SHIFT = 3
_PRIME_MOD = (
    1,
    2,
    3,
    7,
    13,
    31,
    61,
    127,
    251,
    509,
    1021,
    2039,
    4093,
    8191,
    16381,
    32749,
    65521,
    131071,
    262139,
    524287,
    1048573,
    2097143,
    4194301,
    8388593,
    16777213,
    33554393,
    67108859,
    134217689,
    268435399,
    536870909,
    1073741789,
    2147483647,
)
_UNUSED, _TOMBSTONE = 0, 1
_M32 = 0xFFFFFFFF


def _tdb_hash(key: bytes) -> int:
    value = (0x238F13AF * len(key)) & _M32
    for i, byte in enumerate(key):
        value = (value + (byte << (i * 5 % 24))) & _M32
    return (1103515243 * value + 12345) & _M32


def _g_str_hash(key: bytes) -> int:
    h = 5381
    for byte in key:
        signed = byte - 256 if byte >= 128 else byte
        h = (h * 33 + signed) & _M32
    return h


def qdict_order(keys: list[str]) -> list[str]:
    """The order ``qdict_first``/``qdict_next`` iterate keys inserted in ``keys`` order."""
    buckets: dict[int, list[str]] = {}
    for key in keys:
        buckets.setdefault(_tdb_hash(key.encode()) % _QDICT_BUCKETS, []).insert(0, key)
    return [key for bucket in sorted(buckets) for key in buckets[bucket]]


class UnvisitedKeys:
    """The keys of one JSON object the visitor has not consumed yet."""

    def __init__(self, keys: list[str]) -> None:
        self._set_shift(_MIN_SHIFT)
        self._hashes = [_UNUSED] * self._size
        self._keys: list[str | None] = [None] * self._size
        self._nnodes = 0
        self._noccupied = 0
        for key in qdict_order(keys):
            self._insert(key)

    def _set_shift(self, shift: int) -> None:
        self._size = 1 << shift
        self._mod = _PRIME_MOD[shift]
        self._mask = self._size - 1

    @staticmethod
    def _hash(key: str) -> int:
        h = _g_str_hash(key.encode())
        return 2 if h <= 1 else h

    def _lookup_for_insertion(self, key: str, h: int) -> int:
        index = ((h * 11) & _M32) % self._mod
        step = 0
        first_tombstone = None
        while self._hashes[index] != _UNUSED:
            if self._hashes[index] == h and self._keys[index] == key:
                return index
            if self._hashes[index] == _TOMBSTONE and first_tombstone is None:
                first_tombstone = index
            step += 1
            index = (index + step) & self._mask
        return first_tombstone if first_tombstone is not None else index

    def _lookup(self, key: str) -> int | None:
        h = self._hash(key)
        index = ((h * 11) & _M32) % self._mod
        step = 0
        while self._hashes[index] != _UNUSED:
            if self._hashes[index] == h and self._keys[index] == key:
                return index
            step += 1
            index = (index + step) & self._mask
        return None

    def _insert(self, key: str) -> None:
        h = self._hash(key)
        index = self._lookup_for_insertion(key, h)
        old = self._hashes[index]
        if old > _TOMBSTONE:
            return
        self._hashes[index] = h
        self._keys[index] = key
        self._nnodes += 1
        if old == _UNUSED:
            self._noccupied += 1
            self._maybe_resize()

    def discard(self, key: str) -> None:
        """The visitor consumed ``key``."""
        index = self._lookup(key)
        if index is None:
            return
        self._hashes[index] = _TOMBSTONE
        self._keys[index] = None
        self._nnodes -= 1
        self._maybe_resize()

    def _maybe_resize(self) -> None:
        size = self._size
        if (
            size > self._nnodes * 4 and size > 1 << _MIN_SHIFT
        ) or size <= self._noccupied + self._noccupied // 16:
            self._resize()

    def _resize(self) -> None:
        old_size = self._size
        target = int(self._nnodes * 1.333)
        shift = 0
        while target:
            shift += 1
            target >>= 1
        self._set_shift(max(shift, _MIN_SHIFT))
        if self._size > old_size:
            self._hashes += [_UNUSED] * (self._size - old_size)
            self._keys += [None] * (self._size - old_size)
        placed = [False] * max(self._size, old_size)
        for i in range(old_size):
            node_hash = self._hashes[i]
            if node_hash <= _TOMBSTONE:
                self._hashes[i] = _UNUSED
                continue
            if placed[i]:
                continue
            self._hashes[i] = _UNUSED
            key = self._keys[i]
            self._keys[i] = None
            while True:
                index = ((node_hash * 11) & _M32) % self._mod
                step = 0
                while placed[index]:
                    step += 1
                    index = (index + step) & self._mask
                placed[index] = True
                replaced_hash = self._hashes[index]
                replaced_key = self._keys[index]
                self._hashes[index] = node_hash
                self._keys[index] = key
                if replaced_hash <= _TOMBSTONE:
                    break
                node_hash, key = replaced_hash, replaced_key
        if self._size < old_size:
            del self._hashes[self._size :]
            del self._keys[self._size :]
        self._noccupied = self._nnodes

    def first(self) -> str | None:
        """The key QEMU's ``g_hash_table_iter_next`` would yield first, if any."""
        for h, key in zip(self._hashes, self._keys, strict=False):
            if h > _TOMBSTONE:
                return key
        return None
