"""The order in which QEMU iterates a QDict (its members' hash buckets).

QEMU's replies list members in that order, and some of its checks walk
options in it (blockdev-reopen names the first offending option), so both
the wire encoder and the block layer need it.
"""

from __future__ import annotations

from functools import lru_cache

_BUCKETS = 512


def _tdb_hash(key: str) -> int:
    data = key.encode("utf-8", "surrogatepass")
    value = (0x238F13AF * len(data)) & 0xFFFFFFFF
    for i, byte in enumerate(data):
        value = (value + (byte << (i * 5 % 24))) & 0xFFFFFFFF
    return (1103515243 * value + 12345) & 0xFFFFFFFF


@lru_cache(maxsize=4096)
def qdict_order(keys: tuple[str, ...]) -> tuple[str, ...]:
    """The order QEMU iterates a QDict whose members were inserted as ``keys``."""
    return tuple(
        key
        for _, _, key in sorted(
            (_tdb_hash(key) % _BUCKETS, -index, key) for index, key in enumerate(keys)
        )
    )
