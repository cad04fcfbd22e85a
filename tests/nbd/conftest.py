"""Fixtures of the NBD tests: scenario exports, a served catalog."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import trio

from qmpd.nbd.server import NbdServer, unix_listener
from tests.nbd import scenarios
from tests.nbd.memory import Catalog, MemoryExport


def scenario_catalog(*, now: bool = False) -> Catalog:
    """The exports of scenarios.EXPORTS over scenarios.image(), as qsd serves them;
    ``now``: they answer reads at once (MemoryExport.now), as cached nodes do."""
    exports = []
    for spec in scenarios.EXPORTS:
        exports.append(MemoryExport.from_image(
            spec["name"], scenarios.image(), scenarios.ZEROES_END, writable=spec["writable"],
            description=spec["description"], allocation_depth=spec["allocation_depth"],
            min_block=spec.get("align", 1), now=now))
    return Catalog(*exports)


@pytest.fixture
def sockdir():
    with tempfile.TemporaryDirectory(prefix="qmpd-nbd-") as d:
        yield Path(d)


async def start_server(nursery: trio.Nursery, catalog: Catalog, path: Path, **kw) -> NbdServer:
    server = NbdServer(catalog.lookup, catalog.list_exports, **kw)
    await nursery.start(server.serve, [unix_listener(str(path))])
    return server
