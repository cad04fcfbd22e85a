"""The small byte interface under the LUKS engine.

The engine reads and writes through :class:`ImageIO` only, with offsets
relative to the start of the LUKS header (0 for a raw LUKS file; the
header's position inside a qcow2 file is the block layer's business). The
calls are synchronous: the daemon runs the engine in worker threads.
"""

from __future__ import annotations

import os
from typing import Protocol, runtime_checkable


def pread_fully(fd: int, length: int, offset: int) -> bytes:
    """pread() until ``length`` bytes or end of file (a short read is not EOF)."""
    chunks = []
    while length > 0:
        chunk = os.pread(fd, length, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
        length -= len(chunk)
    return b"".join(chunks)


@runtime_checkable
class ImageIO(Protocol):
    def read(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset``; fewer only at end of file."""

    def write(self, offset: int, data: bytes) -> None:
        """Write all of ``data`` at ``offset`` (extending the file if needed)."""

    def sync(self) -> None:
        """Barrier: everything written before is durable when this returns."""

    def size(self) -> int:
        """Bytes from the header start to the end of the file."""


class MemoryImageIO:
    """An image held in a bytearray (tests, and building images in memory)."""

    def __init__(self, data: bytes | bytearray = b"") -> None:
        self.data = bytearray(data)

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.data[offset:offset + length])

    def write(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        if end > len(self.data):
            self.data.extend(bytes(end - len(self.data)))
        self.data[offset:end] = data

    def sync(self) -> None:
        pass

    def size(self) -> int:
        return len(self.data)


class FileImageIO:
    """A file, by path or by an already open descriptor, from ``base_offset``.

    A descriptor passed in stays the caller's; a path is opened (read-write
    unless ``readonly``) and closed by :meth:`close`.
    """

    def __init__(self, fd_or_path: int | str | os.PathLike, base_offset: int = 0,
                 *, readonly: bool = False) -> None:
        if isinstance(fd_or_path, int):
            self._fd = fd_or_path
            self._owned = False
        else:
            flags = os.O_RDONLY if readonly else os.O_RDWR
            self._fd = os.open(fd_or_path, flags | getattr(os, "O_CLOEXEC", 0))
            self._owned = True
        self._base = base_offset

    def read(self, offset: int, length: int) -> bytes:
        return pread_fully(self._fd, length, self._base + offset)

    def write(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        position = self._base + offset
        while view:
            written = os.pwrite(self._fd, view, position)
            view = view[written:]
            position += written

    def sync(self) -> None:
        os.fsync(self._fd)

    def size(self) -> int:
        return max(0, os.fstat(self._fd).st_size - self._base)

    def close(self) -> None:
        if self._owned and self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "FileImageIO":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
