"""POSIX file I/O that finishes what it starts: the edge under every image.

pread()/pwrite() may transfer fewer bytes than asked (signals, pipes, some
filesystems); these loops go on until done or end of file. FileImageIO is
the LUKS engine's ImageIO over a plain file, for tools and tests that work
on an image without the block layer.
"""

from __future__ import annotations

import os


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


def pwrite_fully(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """pwrite() until every byte of ``data`` is written at ``offset``."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


class FileImageIO:
    """A file, by path or by an already open descriptor, from ``base_offset``.

    A descriptor passed in stays the caller's; a path is opened (read-write
    unless ``readonly``) and closed by :meth:`close`.
    """

    def __init__(
        self, fd_or_path: int | str | os.PathLike, base_offset: int = 0, *, readonly: bool = False
    ) -> None:
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
        pwrite_fully(self._fd, data, self._base + offset)

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
