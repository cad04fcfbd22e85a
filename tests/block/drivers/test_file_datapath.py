"""The file node's data path, opened through a BlockGraph.

Model tests (random reads, writes, zeroes, discards at any alignment);
block status against SEEK_DATA/SEEK_HOLE of a sparse file; zeroing and
discard against st_blocks (punch-hole with discard=unmap, zero-range
otherwise); the length of a file whose size is not a multiple of 512
(QEMU counts sectors: the tail reads as zeroes); errors of the async API.
"""

from __future__ import annotations

import errno
import os

import pytest
import trio
from hypothesis import given

from qmpd.block import query
from tests.block.drivers.datapath_helpers import (
    DISCARD_KEEPS, DISCARD_ZEROES, KiB, MiB, allocated_bytes, file_node, model_settings,
    opened, operations, run_model, sparse_file)

SIZES = [2 * MiB, 2 * MiB + 1000]


def _seed_file(path: str, size: int) -> None:
    """A sparse file with a few data runs (some unaligned)."""
    sparse_file(path, size)
    fd = os.open(path, os.O_WRONLY)
    try:
        for offset, n in ((0, 4096), (100 * KiB + 3, 5000), (MiB, 64 * KiB), (size - 700, 700)):
            os.pwrite(fd, bytes([0x5A]) * n, offset)
    finally:
        os.close(fd)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("discard", ["unmap", "ignore"])
def test_model(tmp_path_factory, size, discard):
    effect = DISCARD_ZEROES if discard == "unmap" else DISCARD_KEEPS
    counter = iter(range(10**6))

    @model_settings(25)
    @given(ops=operations(-(-size // 512) * 512))
    def check(ops):
        path = str(tmp_path_factory.mktemp("f") / f"m{next(counter)}.img")
        _seed_file(path, size)
        trio.run(run_model, [file_node("f0", path, discard=discard)], ops, effect)

    check()


# -- block status, zeroes and discard on a sparse file -----------------------------------

def seek_runs(path: str, start: int, end: int) -> list[tuple[int, int, bool]]:
    """(offset, length, is_data) from SEEK_DATA/SEEK_HOLE, the oracle."""
    fd = os.open(path, os.O_RDONLY)
    runs = []
    try:
        pos = start
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as err:
                assert err.errno == errno.ENXIO
                data = end
            if data > pos:
                runs.append((pos, min(data, end) - pos, False))
                pos = min(data, end)
                continue
            hole = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
            runs.append((pos, hole - pos, True))
            pos = hole
    finally:
        os.close(fd)
    return runs


def merged(runs):
    out = []
    for start, length, data in runs:
        if out and out[-1][2] == data and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length, data)
        else:
            out.append((start, length, data))
    return out


async def all_extents(node, start: int, end: int):
    runs, pos = [], start
    while pos < end:
        extents = await node.get_block_status(pos, end - pos)
        assert extents and sum(e.length for e in extents) <= end - pos
        for e in extents:
            assert e.zero == (not e.data) and e.allocated
            runs.append((pos, e.length, e.data))
            pos += e.length
    return runs


async def test_block_status_follows_seek_data(tmp_path):
    path = str(tmp_path / "s.img")
    size = 8 * MiB + 1000
    _seed_file(path, size)
    async with opened(file_node("f0", path)) as (_, [node]):
        assert node.length() == 8 * MiB + 1024
        for start, end in ((0, node.length()), (3, 200 * KiB), (MiB + 5, 3 * MiB),
                           (size - 1, node.length()), (4096, 4097)):
            ours = merged(await all_extents(node, start, end))
            oracle = seek_runs(path, start, min(end, size))
            if end > size:   # the sector-rounded tail past EOF: zeroes, no data
                oracle.append((max(start, size), end - max(start, size), False))
            assert ours == merged(oracle), (start, end)
        # the data runs read as data, the holes as zeroes
        for start, length, data in merged(await all_extents(node, 0, node.length())):
            got = await node.read(start, length)
            if not data:
                assert got == bytes(length)


async def test_zeroes_and_discard_punch_holes_with_discard_unmap(tmp_path):
    path = str(tmp_path / "z.img")
    size = 4 * MiB
    sparse_file(path, size)
    async with opened(file_node("f0", path, discard="unmap")) as (_, [node]):
        await node.write(0, b"\x11" * size)
        await node.flush_all()
        full = allocated_bytes(path)
        assert full >= size
        await node.write_zeroes(MiB, MiB, may_unmap=True)       # punched
        after_unmap = allocated_bytes(path)
        assert after_unmap <= full - MiB
        await node.write_zeroes(2 * MiB, MiB, may_unmap=False)  # zeroed in place
        assert allocated_bytes(path) >= after_unmap - 64 * KiB
        await node.discard(3 * MiB + 10, 512 * KiB)             # punched (partial blocks zeroed)
        assert allocated_bytes(path) <= after_unmap - 448 * KiB
        assert await node.read(MiB - 1, 2) == b"\x11\x00"
        assert await node.read(MiB, 2 * MiB) == bytes(2 * MiB)
        assert await node.read(3 * MiB + 10, 512 * KiB) == bytes(512 * KiB)
        assert await node.read(3 * MiB + 9, 1) == b"\x11"
        assert await node.read(3 * MiB + 10 + 512 * KiB, 1) == b"\x11"
        runs = merged(await all_extents(node, 0, size))
        assert (MiB, MiB, False) in [(s, n, d) for s, n, d in runs] or any(
            s <= MiB and s + n >= 2 * MiB and not d for s, n, d in runs)


async def test_discard_ignored_and_zeroes_kept_allocated_by_default(tmp_path):
    path = str(tmp_path / "k.img")
    sparse_file(path, 2 * MiB)
    async with opened(file_node("f0", path)) as (_, [node]):   # discard=ignore
        await node.write(0, b"\x22" * (2 * MiB))
        await node.flush_all()
        full = allocated_bytes(path)
        await node.discard(0, MiB)
        assert allocated_bytes(path) == full
        assert await node.read(0, MiB) == b"\x22" * MiB
        await node.write_zeroes(0, MiB, may_unmap=True)   # no unmap without discard=unmap
        assert allocated_bytes(path) >= full - 64 * KiB
        assert await node.read(0, MiB) == bytes(MiB)


async def test_fast_zeroes_and_fua(tmp_path):
    path = str(tmp_path / "fz.img")
    sparse_file(path, MiB)
    async with opened(file_node("f0", path, discard="unmap")) as (_, [node]):
        await node.write(0, b"\x33" * MiB, fua=True)
        await node.write_zeroes(4096, 8192, may_unmap=True, fast=True, fua=True)
        assert await node.read(4095, 8194) == b"\x33" + bytes(8192) + b"\x33"


# -- the length of a file that is not a multiple of 512 ----------------------------------

async def test_length_is_rounded_up_to_sectors(tmp_path):
    path = str(tmp_path / "odd.img")
    with open(path, "wb") as f:
        f.write(os.urandom(593921))
    content = open(path, "rb").read()
    async with opened(file_node("f0", path)) as (graph, [node]):
        assert node.length() == 594432
        [info] = await trio.to_thread.run_sync(query.named_block_nodes, graph, True)
        assert info["image"]["virtual-size"] == 594432
        assert await node.read(593920, 512) == content[593920:] + bytes(511)
        assert await node.read(593921, 511) == bytes(511)
        # a write into the tail grows the file within the last sector only
        await node.write(594000, b"\xee" * 432)
        assert os.path.getsize(path) == 594432 and node.length() == 594432
        assert await node.read(593920, 512) == (content[593920:] + bytes(79)
                                                + b"\xee" * 432)
        with pytest.raises(OSError) as info:
            await node.read(594432 - 1, 2)
        assert info.value.errno == errno.EINVAL


async def test_request_errors(tmp_path):
    path = sparse_file(str(tmp_path / "e.img"), MiB)
    async with opened(file_node("f0", path, **{"read-only": True})) as (_, [node]):
        for call in (node.read(MiB, 1), node.read(-1, 1), node.get_block_status(MiB - 1, 2)):
            with pytest.raises(OSError) as info:
                await call
            assert info.value.errno == errno.EINVAL
        for call in (node.write(0, b"x"), node.write_zeroes(0, 1), node.discard(0, 512)):
            with pytest.raises(OSError) as info:
                await call
            assert info.value.errno == errno.EPERM
        assert await node.read(MiB, 0) == b""
        assert await node.get_block_status(0, 0) == []
