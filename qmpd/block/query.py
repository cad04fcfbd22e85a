"""query-named-block-nodes: BlockDeviceInfo of every node, newest first (QEMU's order).

Reads cached state plus one fstat per node, so callers run it in a worker
thread; ``flat`` only matters for backing chains, which qmpd does not open.
"""

from __future__ import annotations

from qmpd.block.graph import BlockGraph
from qmpd.block.node import Node


def named_block_nodes(graph: BlockGraph, flat: bool = False) -> list[dict]:
    return [device_info(node) for node in graph.newest_first()]


def device_info(node: Node) -> dict:
    cache = node.options.get("cache") or {}
    return {
        "iops_rd": 0,
        "detect_zeroes": node.options.get("detect-zeroes", "off"),
        "image": node.image_info(),
        "iops_wr": 0,
        "ro": node.read_only,
        "node-name": node.name,
        "backing_file_depth": 0,
        "drv": node.driver,
        "iops": 0,
        "bps_wr": 0,
        "write_threshold": 0,
        "encrypted": node.encrypted(),
        "bps": 0,
        "bps_rd": 0,
        "cache": {
            "no-flush": bool(cache.get("no-flush", False)),
            "direct": bool(cache.get("direct", False)),
            "writeback": True,
        },
        "file": node.filename(),
    }
