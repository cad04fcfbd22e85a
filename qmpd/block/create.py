"""blockdev-create: the job body that writes a new image through its driver.

A format driver writes onto its ``file``: an existing node by name, or one
given inline, which is opened for the job (an implicit node, as QEMU's
bdrv_open_blockdev_ref) and closed when the job ends. A luks create with a
detached ``header`` (QEMU 9.0) may leave ``file`` out; the driver then
opens its BlockdevRefs itself, in QEMU's order, with the :func:`job_node`
it is handed (``open_ref``: drivers cannot import this module).
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator, Protocol

import trio

from qmpd.block import blockdev
from qmpd.block.drivers import DRIVERS
from qmpd.block.graph import BlockGraph
from qmpd.block.node import Node
from qmpd.errors import QMPError


class Progress(Protocol):
    def set(self, current: int, total: int) -> None: ...


@asynccontextmanager
async def job_node(graph: BlockGraph, ref: str | dict) -> AsyncIterator[Node]:
    """The node a BlockdevRef names, for the job: found by name, or opened
    from inline options (implicit) and closed when the job is done with it."""
    async with graph.lock:
        if isinstance(ref, dict):
            node = await blockdev.open_node(graph, ref, implicit=True, inherited=None)
        else:
            node = graph.lookup_bs(ref, device=ref)
    try:
        yield node
    finally:
        if isinstance(ref, dict):
            with trio.CancelScope(shield=True):
                async with graph.lock:
                    await graph.close_node(node)


async def run(graph: BlockGraph, options: dict, progress: Progress) -> None:
    name = options["driver"]
    driver = DRIVERS.get(name)
    progress.set(0, 1)
    if driver is None or driver.create is None:
        raise QMPError.generic(f"Driver '{name}' does not support blockdev-create")
    if driver.open is not None:  # a protocol driver: nothing underneath
        await driver.create(graph, options)
        progress.set(1, 1)
        return
    ref = options.get("file")
    if ref is None or "header" in options:  # luks, detached: the driver opens both
        await driver.create(graph, options, None, open_ref=job_node)
    else:
        async with job_node(graph, ref) as target:
            await driver.create(graph, options, target)
    progress.set(1, 1)
