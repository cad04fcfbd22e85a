"""The data path every block node offers: what a driver implements.

A node's data path is synchronous and thread-safe: the block layer runs a
whole request (a format driver's crypto and its child's file I/O) in ONE
worker thread, so a request costs one thread hand-off, not one per layer.
Offsets and lengths are in bytes of the node's guest-visible disk.

Errors are ``OSError`` with an errno (EIO, ENOSPC, EPERM, EINVAL, ENOTSUP):
the NBD server puts the errno on the wire, QMP callers turn it into text.

Alignment: a driver declares ``request_alignment`` (QEMU's bl.request_alignment:
1 for files, 512 for LUKS, the sector size of LUKS2); callers that are not
aligned go through :class:`AlignedAccess`, which bounces them through
read-modify-write as QEMU's bdrv_co_pwritev does. Drivers only ever see
aligned requests from it.
"""

from __future__ import annotations

import errno
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

_mode = threading.local()


@contextmanager
def no_waiting() -> Iterator[None]:
    """Reads in this block must not wait for the disk: the file driver reads
    with RWF_NOWAIT and raises BlockingIOError when the data is not in the
    page cache. Lets small reads run on the event loop without blocking it."""
    _mode.no_wait = True
    try:
        yield
    finally:
        _mode.no_wait = False


def waiting_forbidden() -> bool:
    return getattr(_mode, "no_wait", False)


@dataclass(frozen=True)
class Extent:
    """One run of a node's disk with the same status (QEMU's BDRV_BLOCK_*).

    ``data``: the bytes are stored at this layer or below (not a hole);
    ``zero``: the bytes read as zeroes; ``allocated``: this node itself
    answers for the run (qcow2: an L2 entry; files and LUKS: always) — the
    NBD meta context qemu:allocation-depth reports it.
    """

    length: int
    data: bool = True
    zero: bool = False
    allocated: bool = True


class DataPath(Protocol):
    """The synchronous data path of a node (run in worker threads)."""

    request_alignment: int

    def length(self) -> int:
        """The guest-visible size in bytes."""

    def pread(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes (reads past the end are the caller's error)."""

    def pread_many(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """pread of each (offset, length), all aligned; a burst in one call."""

    def pwrite(
        self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False
    ) -> None:
        """Write all of ``data``; with ``fua`` it is durable when this returns."""

    def pwrite_zeroes(
        self,
        offset: int,
        length: int,
        *,
        may_unmap: bool = False,
        fua: bool = False,
        fast: bool = False,
    ) -> None:
        """Make the range read as zeroes; ``fast``: fail with ENOTSUP unless
        that is cheaper than writing zeroes (NBD_CMD_FLAG_FAST_ZERO)."""

    def pdiscard(self, offset: int, length: int) -> None:
        """The guest no longer needs the range (contents then unspecified)."""

    def flush(self) -> None:
        """Every write acknowledged before is durable when this returns."""

    def block_status(self, offset: int, length: int) -> list[Extent]:
        """Extents from ``offset`` covering at least one byte, at most ``length``."""


#: QEMU's BDRV_MAX_LENGTH: INT64_MAX aligned down to BDRV_MAX_ALIGNMENT
#: (1 GiB), the largest size a truncate may ask for.
BDRV_MAX_LENGTH = 9223372035781033984


def check_request(offset: int, length: int, size: int) -> None:
    """QEMU's bdrv_check_request: inside the disk, non-negative."""
    if offset < 0 or length < 0 or offset + length > size:
        raise OSError(errno.EINVAL, "request out of range")


class AlignedAccess:
    """Any-alignment access to a node whose driver wants aligned requests.

    Unaligned heads and tails of a write are read, patched and written
    back; a per-object lock keeps two read-modify-writes of the same
    alignment unit from losing each other's bytes (QEMU serialises
    overlapping unaligned requests the same way).
    """

    def __init__(self, node: DataPath) -> None:
        self.node = node
        self._rmw = threading.Lock()

    @property
    def alignment(self) -> int:
        return max(1, self.node.request_alignment)

    def _span(self, offset: int, length: int) -> tuple[int, int]:
        align = self.alignment
        start = offset - offset % align
        end = -(-(offset + length) // align) * align
        return start, end

    def pread(self, offset: int, length: int) -> bytes:
        start, end = self._span(offset, length)
        if start == offset and end == offset + length:
            return self.node.pread(offset, length)
        size = self.node.length()
        data = self.node.pread(start, min(end, size) - start)
        return data[offset - start : offset - start + length]

    def pread_many(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        align = self.alignment
        if all((offset | length) % align == 0 for offset, length in ranges):
            return self.node.pread_many(ranges)
        return [self.pread(offset, length) for offset, length in ranges]

    def pwrite(
        self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False
    ) -> None:
        length = len(data)
        start, end = self._span(offset, length)
        if start == offset and end == offset + length:
            self.node.pwrite(offset, data, fua=fua)
            return
        with self._rmw:
            buffer = bytearray(self.node.pread(start, end - start))
            buffer[offset - start : offset - start + length] = data
            self.node.pwrite(start, buffer, fua=fua)

    def pwrite_zeroes(
        self,
        offset: int,
        length: int,
        *,
        may_unmap: bool = False,
        fua: bool = False,
        fast: bool = False,
    ) -> None:
        align = self.alignment
        head = (-offset) % align
        if head >= length or align == 1:
            if align == 1 or (offset % align == 0 and length % align == 0):
                self.node.pwrite_zeroes(offset, length, may_unmap=may_unmap, fua=fua, fast=fast)
                return
            if fast:
                raise OSError(errno.ENOTSUP, "fast zero of an unaligned range")
            self.pwrite(offset, bytes(length), fua=fua)
            return
        if fast and (head or (offset + length) % align):
            raise OSError(errno.ENOTSUP, "fast zero of an unaligned range")
        if head:
            self.pwrite(offset, bytes(head), fua=fua)
        body_start = offset + head
        body_end = (offset + length) - (offset + length) % align
        if body_end > body_start:
            self.node.pwrite_zeroes(
                body_start, body_end - body_start, may_unmap=may_unmap, fua=fua, fast=fast
            )
        if offset + length > body_end and body_end >= body_start:
            self.pwrite(body_end, bytes(offset + length - body_end), fua=fua)

    def pdiscard(self, offset: int, length: int) -> None:
        # Discard is advisory: only the aligned middle is passed on (QEMU too).
        start = -(-offset // self.alignment) * self.alignment
        end = (offset + length) - (offset + length) % self.alignment
        if end > start:
            self.node.pdiscard(start, end - start)

    def flush(self) -> None:
        self.node.flush()

    def block_status(self, offset: int, length: int) -> list[Extent]:
        return self.node.block_status(offset, length)

    def length(self) -> int:
        return self.node.length()
