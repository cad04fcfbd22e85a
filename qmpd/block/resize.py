"""block_resize: grow (or, where the driver can, shrink) a node, as QEMU 7.2.

The resize runs as a user that takes RESIZE and shares everything (QEMU's
temporary BlockBackend), so a parent that refuses resizing (a qcow2 node
over its file, an export) makes it fail with QEMU's permission text. Then
Node.truncate_to: QEMU's bdrv_co_truncate checks (the size limit, read-only)
before the driver's own; a format driver resizes its file the same way.
"""

from __future__ import annotations

import errno
import os

import trio

from qmpd.block.graph import BlockGraph
from qmpd.block.permissions import ALL, Perm, PermissionUse
from qmpd.errors import QMPError

RESIZE_USE = PermissionUse("an unnamed block device", "root", Perm.RESIZE, ALL)


async def run(graph: BlockGraph, device: str | None, node_name: str | None, size: int) -> None:
    async with graph.lock:
        node = graph.find(node_name) if node_name is not None else None
        if node is None:
            raise QMPError.generic(
                f"Cannot find device='{device or ''}' nor node-name='{node_name or ''}'"
            )
        if size < 0:
            raise QMPError.generic("Parameter 'size' expects a >0 size")
        if node.busy:
            raise QMPError.generic(f"Device '{device or ''}' is in use")
        await graph.refresh(node, [RESIZE_USE])
        try:
            try:
                await trio.to_thread.run_sync(node.truncate_to, size)
            except OSError as err:
                raise QMPError.generic(os.strerror(err.errno or errno.EIO)) from None
        finally:
            with trio.CancelScope(shield=True):
                await graph.release(node)
