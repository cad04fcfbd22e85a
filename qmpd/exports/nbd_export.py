"""One NBD export: a parent of its block node, and what the NBD server serves.

As QEMU's block/export/export.c and nbd/server.c: the export holds its node
with CONSISTENT_READ (+ WRITE when writable) and shares everything but
RESIZE, so the disk cannot change size under its clients. Requests go to
the node's async data path, each in one worker thread; ``writethrough``
makes every write FUA. The export's size is read once, when it is added.
"""

from __future__ import annotations

from typing import Sequence

from qmpd.block.datapath import Extent
from qmpd.block.node import Node
from qmpd.block.permissions import ALL, Perm


class NbdBlockExport:
    """block-export-add type=nbd."""

    type = "nbd"

    def __init__(
        self,
        export_id: str,
        node: Node,
        *,
        name: str,
        description: str | None,
        writable: bool,
        writethrough: bool,
        allocation_depth: bool,
    ) -> None:
        self.id = export_id
        self.node = node
        self.name = name
        self.description = description
        self.writable = writable
        self.writethrough = writethrough
        self.allocation_depth = allocation_depth
        self.shutting_down = False
        #: While adding, RESIZE is still shared (QEMU narrows it after insertion).
        self.share_resize = True
        self.size = 0
        self.min_block = node.request_alignment

    # -- as a parent of the node ------------------------------------------------
    user_description = "an unnamed block device"

    def child_role(self, child: Node) -> str:
        return "root"

    def child_perms(self, child: Node) -> tuple[Perm, Perm]:
        perm = Perm.CONSISTENT_READ | (Perm.WRITE if self.writable else Perm(0))
        return perm, ALL if self.share_resize else ALL & ~Perm.RESIZE

    def info(self) -> dict:
        return {
            "id": self.id,
            "type": self.type,
            "node-name": self.node.name,
            "shutting-down": self.shutting_down,
        }

    # -- what the NBD server calls -------------------------------------------------
    async def read(self, offset: int, length: int) -> bytes:
        return await self.node.read(offset, length)

    def read_now(self, ranges: Sequence[tuple[int, int]]) -> list[bytes] | None:
        return self.node.read_now(ranges)

    def block_status_now(self, offset: int, length: int) -> Sequence[Extent] | None:
        return self.node.block_status_now(offset, length)

    async def write(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        await self.node.write(offset, data, fua=fua or self.writethrough)

    async def write_zeroes(
        self, offset: int, length: int, *, may_unmap: bool, fua: bool, fast: bool
    ) -> None:
        await self.node.write_zeroes(
            offset, length, may_unmap=may_unmap, fua=fua or self.writethrough, fast=fast
        )

    async def trim(self, offset: int, length: int) -> None:
        await self.node.discard(offset, length)

    async def flush(self) -> None:
        await self.node.flush_all()

    async def cache(self, offset: int, length: int) -> None:
        """NBD_CMD_CACHE: nothing to prefetch into (no backing chains); success."""

    async def block_status(self, offset: int, length: int) -> Sequence[Extent]:
        return await self.node.get_block_status(offset, length)
