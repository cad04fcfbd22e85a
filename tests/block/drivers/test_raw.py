"""The raw format driver over a file: the whole file, or a window (offset, size).

Model tests through a BlockGraph (the bytes outside a window never change);
qemu-io as the oracle on the same window both ways (what qmpd writes,
qemu-io reads with a pattern check, and the other way round); QEMU's open
and resize texts in its order (the same cases are recorded against qsd in
tests/tools/qsd_cases_block_io.py).
"""

from __future__ import annotations

import os
import random

import pytest
import trio
from hypothesis import given

from qmpd.block import blockdev, query
from qmpd.block import resize as block_resize
from qmpd.errors import QMPError
from tests.block.drivers.datapath_helpers import (
    DISCARD_KEEPS, DISCARD_ZEROES, KiB, MiB, file_node, model_settings, opened,
    operations, qemu_io, raw_node, read_all, run_model)

FILE_SIZE = 3 * MiB
WINDOWS = [(None, None), (4096, None), (512, 2 * MiB), (65536 + 512, MiB + 512), (0, 1024 * KiB)]


def _random_file(path: str, size: int = FILE_SIZE, seed: int = 1) -> bytes:
    data = random.Random(seed).randbytes(size)
    with open(path, "wb") as f:
        f.write(data)
    return data


@pytest.mark.parametrize("offset,size", WINDOWS)
@pytest.mark.parametrize("discard", ["unmap", "ignore"])
def test_model(tmp_path_factory, offset, size, discard):
    effect = DISCARD_ZEROES if discard == "unmap" else DISCARD_KEEPS
    lo = offset or 0
    length = size if size is not None else FILE_SIZE - lo
    counter = iter(range(10**6))

    @model_settings(10)
    @given(ops=operations(length, hot=256 * KiB))
    def check(ops):
        path = str(tmp_path_factory.mktemp("r") / f"m{next(counter)}.img")
        original = _random_file(path, seed=next(counter))
        opts = raw_node("r0", path, offset=offset, size=size, file_extra={"discard": discard})
        model = trio.run(run_model, [opts], ops, effect)
        with open(path, "rb") as f:
            after = f.read()
        assert after[:lo] == original[:lo]                       # outside the window
        assert after[lo + length:] == original[lo + length:]
        assert after[lo:lo + length] == bytes(model.data)

    check()


async def test_window_reads_and_writes_the_file_at_its_offset(tmp_path):
    path = str(tmp_path / "w.img")
    original = _random_file(path)
    async with opened(file_node("f0", path), {"driver": "raw", "node-name": "r0",
                                              "file": "f0", "offset": 1536,
                                              "size": 65536}) as (graph, [f0, r0]):
        assert r0.length() == 65536
        assert await r0.read(0, 65536) == original[1536:1536 + 65536]
        await r0.write(100, b"\xab" * 1000)
        assert await f0.read(1636, 1000) == b"\xab" * 1000
        await r0.write_zeroes(65536 - 512, 512)
        assert await f0.read(1536 + 65536 - 512, 513) == bytes(512) + original[1536 + 65536:
                                                                               1536 + 65537]
        for bad in ((65536, 1), (65000, 1000)):
            with pytest.raises(OSError):
                await r0.read(*bad)
        # the raw node's status is the file's, shifted
        assert sum(e.length for e in await r0.get_block_status(0, 65536)) <= 65536
        nodes = {n["node-name"]: n for n in query.named_block_nodes(graph)}
        assert nodes["r0"]["image"]["virtual-size"] == 65536
        assert nodes["r0"]["file"] == (
            'json:{"offset": 1536, "driver": "raw", "size": 65536, "file": '
            f'{{"driver": "file", "filename": "{path}"}}}}')
        assert nodes["r0"]["image"]["format"] == "raw"


async def test_open_errors_in_qemu_order(tmp_path):
    path = str(tmp_path / "e.img")
    with open(path, "wb") as f:
        f.write(bytes(593921))             # 594432 bytes as QEMU counts them
    async with opened(file_node("f0", path)) as (graph, _):
        async def error(**extra):
            with pytest.raises(QMPError) as info:
                await blockdev.add(graph, {"driver": "raw", "node-name": "r0", "file": "f0",
                                           **extra})
            return info.value.desc
        assert await error(offset=600000) == \
            "Offset (600000) cannot be greater than size of the containing file (594432)"
        assert await error(size=600000) == (
            "The sum of offset (0) and size (600000) has to be smaller or equal to the  "
            "actual size of the containing file (594432)")
        assert await error(size=1000) == "Specified size is not multiple of 512"
        assert await error(offset=-1) == \
            "Parameter 'offset' expects a non-negative number below 2^64"
        with pytest.raises(QMPError) as info:   # before the file child is looked up
            await blockdev.add(graph, {"driver": "raw", "node-name": "r0", "file": "nope",
                                       "size": -512})
        assert info.value.desc == "Parameter 'size' expects a non-negative number below 2^64"
        await blockdev.add(graph, {"driver": "raw", "node-name": "r0", "file": "f0",
                                   "offset": 594432})
        assert graph.find("r0").length() == 0


async def test_resize(tmp_path):
    path = str(tmp_path / "z.img")
    _random_file(path, MiB)
    async with opened(file_node("f0", path), {"driver": "raw", "node-name": "w0", "file": "f0",
                                              "offset": 0, "size": 4096}) as (graph, [f0, _]):
        async def error(node, size):
            with pytest.raises(QMPError) as info:
                await block_resize.run(graph, None, node, size)
            return info.value.desc
        assert await error("w0", MiB) == "Cannot resize fixed-size raw disks"
        await blockdev.add(graph, {"driver": "raw", "node-name": "r0", "file": "f0",
                                   "offset": 4096})
        r0 = graph.find("r0")
        # each window unshares resizing the file with the other
        assert await error("r0", MiB) == (
            "Permission conflict on node 'f0': permissions 'resize' are both required by "
            "node 'r0' (uses node 'f0' as 'file' child) and unshared by node 'w0' (uses node "
            "'f0' as 'file' child).")
        await blockdev.delete(graph, "w0")
        assert await error("r0", (1 << 63) - 1) == \
            "offset(9223372036854775807) exceeds maximum(9223372035781033984)"
        assert await error("r0", (1 << 63) - 4095) == \
            "offset(9223372036854771713) exceeds maximum(9223372035781033984)"
        assert await error("f0", 2 * MiB) == (
            "Permission conflict on node 'f0': permissions 'resize' are both required by an "
            "unnamed block device (uses node 'f0' as 'root' child) and unshared by node 'r0' "
            "(uses node 'f0' as 'file' child).")
        await block_resize.run(graph, None, "r0", 2 * MiB + 1)
        assert os.path.getsize(path) == 4096 + 2 * MiB + 1
        assert r0.length() == 2 * MiB + 512 and f0.length() == 4096 + 2 * MiB + 512
        assert await r0.read(2 * MiB - 10, 522) == bytes(522)


# -- qemu-io on the same window ---------------------------------------------------------

def _window_opts(path: str, offset: int | None, size: int | None) -> str:
    opts = f"driver=raw,file.filename={path}"
    if offset is not None:
        opts += f",offset={offset}"
    if size is not None:
        opts += f",size={size}"
    return opts


@pytest.mark.interop
@pytest.mark.parametrize("offset,size", WINDOWS)
async def test_qemu_io_reads_what_qmpd_wrote_and_back(tmp_path, offset, size):
    path = str(tmp_path / "q.img")
    original = _random_file(path)
    lo = offset or 0
    length = size if size is not None else FILE_SIZE - lo
    writes = [(0, 512, 0x11), (513, 1000, 0x22), (length - 4096, 4096, 0x33),
              (65536 - 7, 14, 0x44)]
    async with opened(raw_node("r0", path, offset=offset, size=size)) as (_, [r0]):
        assert r0.length() == length
        for off, n, byte in writes:
            await r0.write(off, bytes([byte]) * n)
        await r0.write_zeroes(200 * KiB + 3, 70 * KiB)
    image = _window_opts(path, offset, size)
    qemu_io(image, *[f"read -P {byte:#x} {off} {n}" for off, n, byte in writes],
            f"read -P 0 {200 * KiB + 3} {70 * KiB}", secret=False)
    # qemu-io writes through the same window; qmpd reads it back
    qemu_io(image, "write -P 0x55 0 512", f"write -P 0x66 {length - 1000} 1000",
            "write -z 4096 8192", secret=False)
    async with opened(raw_node("r0", path, offset=offset, size=size)) as (_, [r0]):
        assert await r0.read(0, 512) == b"\x55" * 512
        assert await r0.read(length - 1000, 1000) == b"\x66" * 1000
        assert await r0.read(4096, 8192) == bytes(8192)
        data = await read_all(r0)
    with open(path, "rb") as f:
        after = f.read()
    assert after[lo:lo + length] == data
    assert after[:lo] == original[:lo] and after[lo + length:] == original[lo + length:]



@pytest.mark.parametrize("prealloc", ["falloc", "full"])
async def test_luks_create_over_a_raw_window_preallocates_in_the_file(tmp_path, prealloc):
    """blockdev-create luks on a raw node with preallocation: passed down to
    the file at the window's offset, as QEMU's truncate passes it (it used to
    fail with an internal error)."""
    from tests.block.drivers.datapath_helpers import NoProgress, SECRETS, Secrets
    from qmpd.block import create as block_create
    from qmpd.block.graph import BlockGraph

    path = str(tmp_path / "disk.img")
    with open(path, "wb") as f:
        f.truncate(1 << 20)
    graph = BlockGraph(Secrets(SECRETS))
    try:
        await blockdev.add(graph, {"driver": "raw", "node-name": "w", "offset": 65536,
                                   "file": {"driver": "file", "filename": path}})
        await block_create.run(graph, {"driver": "luks", "file": "w", "size": 4 << 20,
                                       "key-secret": "s0", "iter-time": 10,
                                       "preallocation": prealloc}, NoProgress())
    finally:
        await graph.close_all()
    st = os.stat(path)
    assert st.st_size >= 65536 + (4 << 20)
    assert st.st_blocks * 512 >= 4 << 20            # allocated, not a hole


async def test_luks_create_with_size_minus_one_is_too_large(tmp_path):
    """QAPI 'size' is uint64: -1 arrives as 2**64 - 1, which QEMU refuses as
    too large (found by the differential run against qsd)."""
    from tests.block.drivers.datapath_helpers import NoProgress, SECRETS, Secrets
    from qmpd.block import create as block_create
    from qmpd.block.graph import BlockGraph

    path = str(tmp_path / "disk.img")
    open(path, "wb").close()
    graph = BlockGraph(Secrets(SECRETS))
    try:
        await blockdev.add(graph, {"driver": "file", "node-name": "f", "filename": path})
        with pytest.raises(QMPError, match="The requested file size is too large"):
            await block_create.run(graph, {"driver": "luks", "file": "f", "size": -1,
                                           "key-secret": "s0", "iter-time": 10}, NoProgress())
    finally:
        await graph.close_all()
    assert os.path.getsize(path) == 0
