"""An in-memory NBD export: a bytearray and a page-granular allocation map.

Holes behave like a file on ext4/tmpfs as qemu-storage-daemon sees it: a
write allocates the 4 KiB pages it touches; discard and zero-writes that
may unmap punch out the pages they cover whole (partial pages are zeroed
and stay allocated); block status reports unallocated pages as holes that
read as zeroes, and everything as allocated at depth 1 (a plain file).
"""

from __future__ import annotations

from dataclasses import dataclass, field

PAGE = 4096


@dataclass(frozen=True)
class Extent:
    length: int
    data: bool = True
    zero: bool = False
    allocated: bool = True


@dataclass(eq=False)
class MemoryExport:
    name: str
    size: int
    writable: bool = True
    description: str | None = None
    min_block: int = 1
    allocation_depth: bool = False
    data: bytearray = field(default=None, repr=False)
    #: one flag per page: True = allocated (data)
    pages: bytearray = field(default=None, repr=False)
    calls: list = field(default_factory=list, repr=False)
    fail: dict = field(default_factory=dict, repr=False)  # method name -> errno

    def __post_init__(self) -> None:
        if self.data is None:
            self.data = bytearray(self.size)
        if self.pages is None:
            self.pages = bytearray(-(-self.size // PAGE))

    @classmethod
    def from_image(cls, name: str, image: bytes, allocated_end: int, **kw) -> MemoryExport:
        exp = cls(name, len(image), data=bytearray(image), **kw)
        exp.pages[:-(-allocated_end // PAGE)] = b"\1" * -(-allocated_end // PAGE)
        return exp

    def _check(self, op: str) -> None:
        self.calls.append(op)
        if op in self.fail:
            raise OSError(self.fail[op], f"injected {op} failure")

    def _allocate(self, offset: int, length: int) -> None:
        first, last = offset // PAGE, -(-(offset + length) // PAGE)
        self.pages[first:last] = b"\1" * (last - first)

    def _punch(self, offset: int, length: int) -> None:
        self.data[offset:offset + length] = bytes(length)
        first, last = -(-offset // PAGE), (offset + length) // PAGE
        if offset + length == self.size:
            last = len(self.pages)
        if last > first:
            self.pages[first:last] = bytes(last - first)

    async def read(self, offset: int, length: int) -> bytes:
        self._check("read")
        return bytes(self.data[offset:offset + length])

    #: Serve reads and block status at once (read_now, block_status_now), as
    #: a node does when everything is cached; off: every request goes through
    #: the async calls (which subclasses override to delay or count).
    now: bool = False

    def read_now(self, ranges) -> list[bytes] | None:
        if not self.now:
            return None
        self._check("read_now")
        return [bytes(self.data[offset:offset + length]) for offset, length in ranges]

    def block_status_now(self, offset: int, length: int) -> list[Extent] | None:
        if not self.now:
            return None
        self._check("block_status_now")
        return self._status(offset, length)

    async def write(self, offset: int, data, fua: bool) -> None:
        self._check("write")
        self.data[offset:offset + len(data)] = data
        self._allocate(offset, len(data))

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool, fua: bool,
                           fast: bool) -> None:
        self._check("write_zeroes")
        if may_unmap:
            self._punch(offset, length)
        else:
            self.data[offset:offset + length] = bytes(length)
            self._allocate(offset, length)

    async def trim(self, offset: int, length: int) -> None:
        self._check("trim")
        self._punch(offset, length)

    async def flush(self) -> None:
        self._check("flush")

    async def cache(self, offset: int, length: int) -> None:
        self._check("cache")

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        self._check("block_status")
        return self._status(offset, length)

    def _status(self, offset: int, length: int) -> list[Extent]:
        end = min(offset + length, self.size)
        out: list[Extent] = []
        pos = offset
        while pos < end:
            allocated = self.pages[pos // PAGE]
            stop = (pos // PAGE + 1) * PAGE
            while stop < end and self.pages[stop // PAGE] == allocated:
                stop += PAGE
            stop = min(stop, end)
            out.append(Extent(stop - pos, data=bool(allocated), zero=not allocated))
            pos = stop
        return out


class Catalog:
    """lookup/list_exports over a dict, in insertion order (QEMU lists in creation order)."""

    def __init__(self, *exports: MemoryExport) -> None:
        self.exports = {e.name: e for e in exports}

    def lookup(self, name: str) -> MemoryExport | None:
        return self.exports.get(name)

    def list_exports(self) -> list[MemoryExport]:
        return list(self.exports.values())
