"""blockdev-create: the job body that writes a new image through its driver.

A format driver writes onto its ``file``: an existing node by name, or one
given inline, which is opened for the job (an implicit node, as QEMU's
bdrv_open_blockdev_ref) and closed when the job ends.
"""

from __future__ import annotations

from typing import Protocol

import trio

from qmpd.block import blockdev
from qmpd.block.drivers import DRIVERS
from qmpd.block.graph import BlockGraph
from qmpd.errors import QMPError


class Progress(Protocol):
    def set(self, current: int, total: int) -> None: ...


async def run(graph: BlockGraph, options: dict, progress: Progress) -> None:
    name = options["driver"]
    driver = DRIVERS.get(name)
    progress.set(0, 1)
    if driver is None or driver.create is None:
        raise QMPError.generic(f"Driver '{name}' does not support blockdev-create")
    if driver.open is not None:          # a protocol driver: nothing underneath
        await driver.create(graph, options)
        progress.set(1, 1)
        return
    ref = options["file"]
    async with graph.lock:
        if isinstance(ref, dict):
            target = await blockdev.open_node(graph, ref, implicit=True, inherited=None)
        else:
            target = graph.lookup_bs(ref, device=ref)
    try:
        await driver.create(graph, options, target)
    finally:
        if isinstance(ref, dict):
            with trio.CancelScope(shield=True):
                async with graph.lock:
                    await graph.close_node(target)
    progress.set(1, 1)
