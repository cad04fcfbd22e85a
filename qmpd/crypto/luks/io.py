"""The small byte interface under the LUKS engine.

The engine reads and writes through :class:`ImageIO` only, with offsets
relative to the start of the LUKS header (0 for a raw LUKS file; the
header's position inside a qcow2 file is the block layer's business). The
calls are synchronous: the daemon runs the engine in worker threads.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


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
        return bytes(self.data[offset : offset + length])

    def write(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        if end > len(self.data):
            self.data.extend(bytes(end - len(self.data)))
        self.data[offset:end] = data

    def sync(self) -> None:
        pass

    def size(self) -> int:
        return len(self.data)
