"""Nodes through the graph: the qcow2 node's data path, block_resize and
blockdev-create's sizes for every driver.

- qcow2 (v2 and v3; 512 B, 64 KiB and 2 MiB clusters; plain and with LUKS):
  model tests on the async Node API (a discard zeroes the clusters wholly
  inside its range), qemu-img check after each example; qemu-io and
  qemu-img as oracles both ways.
- block_resize (qmpd/block/resize.py) on file, luks, raw and qcow2 nodes:
  QEMU's order of checks and texts, growing and shrinking with the data
  kept (the recorded qsd answers for the same requests are the block-io
  group, tests/tools/qsd_cases_block_io.py).
- blockdev-create with an inline ``file`` and with sizes QEMU refuses:
  QEMU's texts, nothing written, never a Python exception's name.
"""

from __future__ import annotations

import os
import random

import pytest
import trio
from hypothesis import given

from qmpd.block import create as block_create
from qmpd.block import query
from qmpd.block import resize as block_resize
from qmpd.block.graph import BlockGraph
from qmpd.errors import QMPError
from tests.block.drivers.datapath_helpers import (
    KiB, MiB, SECRETS, Templates, discard_clusters, file_node, file_ref, luks_node,
    model_settings, opened, operations, qcow2_image_opts, qcow2_node, qemu_img_check,
    qemu_img_convert_raw, qemu_io, qmpd_luks_image, qmpd_qcow2_image, raw_node, read_all,
    run_model, sparse_file)
from tests.block.graph_peer import NoProgress, Secrets
from tests.oracles import run_qemu_img

INT64_MAX = (1 << 63) - 1
BDRV_MAX_LENGTH = 9223372035781033984


@pytest.fixture(scope="module")
def templates():
    t = Templates()
    yield t
    t.close()


def qemu_img_qcow2(size: int, cluster_size: int, version: str):
    def make(path: str) -> None:
        compat = "0.10" if version == "v2" else "1.1"
        run_qemu_img(["create", "-q", "-f", "qcow2", "-o",
                      f"cluster_size={cluster_size},compat={compat}", path, str(size)])
    return make


# -- qcow2: model tests ------------------------------------------------------------------

QCOW2_MODELS = [("v3", 65536, False), ("v2", 65536, False), ("v3", 512, False),
                ("v2", 512, False), ("v3", 2 * MiB, False), ("v3", 65536, True),
                ("v2", 4096, True)]


def _model(tmp_path_factory, templates, version, cluster_size, encrypted, examples, count):
    size = 8 * MiB if cluster_size >= MiB else 3 * MiB
    key = f"{version}-{cluster_size}-{encrypted}"
    make = (qmpd_qcow2_image(size, cluster_size=cluster_size, version=version, encrypted=True)
            if encrypted else qemu_img_qcow2(size, cluster_size, version))
    counter = iter(range(10**6))
    boundaries = tuple(sorted({512, 4096, cluster_size}))

    hot = max(384 * KiB, 3 * cluster_size // 2)

    @model_settings(examples)
    @given(ops=operations(size, boundaries=boundaries, count=count, hot=hot))
    def check(ops):
        path = str(tmp_path_factory.mktemp("q") / f"m{next(counter)}.qcow2")
        templates.copy(key, make, path)
        trio.run(run_model, [qcow2_node("q0", path, encrypted=encrypted)], ops,
                 discard_clusters(cluster_size), bytes(size), hot)
        qemu_img_check(qcow2_image_opts(path, encrypted), secret=encrypted)

    check()


@pytest.mark.parametrize("version,cluster_size,encrypted", QCOW2_MODELS)
def test_qcow2_model(tmp_path_factory, templates, version, cluster_size, encrypted):
    _model(tmp_path_factory, templates, version, cluster_size, encrypted,
           examples=4 if encrypted or cluster_size >= MiB else 6, count=14)


@pytest.mark.soak
@pytest.mark.parametrize("version,cluster_size,encrypted", QCOW2_MODELS)
def test_qcow2_model_soak(tmp_path_factory, templates, version, cluster_size, encrypted):
    _model(tmp_path_factory, templates, version, cluster_size, encrypted, examples=100,
           count=40)


# -- qcow2: qemu-io and qemu-img both ways ---------------------------------------------------

QCOW2_ORACLES = [(v, cs) for v in ("v2", "v3") for cs in (512, 65536, 2 * MiB)]


@pytest.mark.interop
@pytest.mark.parametrize("version,cluster_size", QCOW2_ORACLES)
async def test_qcow2_both_ways(tmp_path, version, cluster_size):
    size = 8 * MiB
    path = str(tmp_path / "p.qcow2")
    image = qcow2_image_opts(path, False)
    await trio.to_thread.run_sync(qemu_img_qcow2(size, cluster_size, version), path)
    zero_opt = "-z -u" if version == "v2" else "-z"
    await trio.to_thread.run_sync(lambda: qemu_io(
        image, "write -P 0x11 0 64k", "write -P 0x22 100k 7k", "write -P 0x33 1m 2m",
        f"write {zero_opt} 1536k 512k", "write -c -P 0x44 4m 2m", "discard 2m 64k",
        secret=False))
    theirs = await trio.to_thread.run_sync(qemu_img_convert_raw, image,
                                           str(tmp_path / "before.raw"), False)
    rng = random.Random(cluster_size)
    async with opened(qcow2_node("q0", path)) as (graph, [node]):
        assert node.length() == size
        assert await read_all(node) == theirs
        pos = 0
        for extent in await node.get_block_status(0, size):
            if extent.zero:
                assert theirs[pos:pos + extent.length] == bytes(extent.length)
            pos += extent.length
        expected = bytearray(theirs)
        for _ in range(8):
            off, n = rng.randrange(0, size - 200 * KiB), rng.randrange(1, 200 * KiB)
            data = rng.randbytes(n)
            await node.write(off, data)
            expected[off:off + n] = data
        await node.write(4 * MiB + 5, b"\x99" * 100)          # into a compressed cluster
        expected[4 * MiB + 5:4 * MiB + 105] = b"\x99" * 100
        zeroes = min(3 * cluster_size, MiB - 1)
        await node.write_zeroes(3 * MiB + 1, zeroes, may_unmap=True)
        expected[3 * MiB + 1:3 * MiB + 1 + zeroes] = bytes(zeroes)
        discard = min(3 * cluster_size, size - 7 * MiB)
        await node.discard(7 * MiB, discard)
        expected[7 * MiB:7 * MiB + discard // cluster_size * cluster_size] = bytes(
            discard // cluster_size * cluster_size)
        await node.flush_all()
        assert await read_all(node) == expected
        [info] = [n for n in query.named_block_nodes(graph) if n["node-name"] == "q0"]
        assert info["image"]["cluster-size"] == cluster_size
    await trio.to_thread.run_sync(lambda: qemu_img_check(image, secret=False))
    after = await trio.to_thread.run_sync(qemu_img_convert_raw, image,
                                          str(tmp_path / "after.raw"), False)
    assert after == expected
    await trio.to_thread.run_sync(lambda: qemu_io(
        image, "read -P 0x99 4194309 100", f"read -P 0 {3 * MiB + 1} {zeroes}",
        secret=False))


# -- block_resize ---------------------------------------------------------------------

async def resize_error(graph, node: str | None, size: int, device: str | None = None) -> str:
    with pytest.raises(QMPError) as info:
        await block_resize.run(graph, device, node, size)
    return info.value.desc


async def test_resize_checks_in_qemu_order(tmp_path):
    path = sparse_file(str(tmp_path / "f.img"), 593921)
    async with opened(file_node("f0", path), file_node("ro", sparse_file(
            str(tmp_path / "ro.img"), MiB), **{"read-only": True})) as (graph, _):
        assert await resize_error(graph, "nope", MiB) == \
            "Cannot find device='' nor node-name='nope'"
        assert await resize_error(graph, None, MiB, device="f0") == \
            "Cannot find device='f0' nor node-name=''"
        assert await resize_error(graph, "nope", -1) == \
            "Cannot find device='' nor node-name='nope'"
        assert await resize_error(graph, "f0", -1) == "Parameter 'size' expects a >0 size"
        assert await resize_error(graph, "f0", INT64_MAX) == \
            f"offset({INT64_MAX}) exceeds maximum({BDRV_MAX_LENGTH})"
        assert await resize_error(graph, "ro", INT64_MAX) == \
            f"offset({INT64_MAX}) exceeds maximum({BDRV_MAX_LENGTH})"
        assert await resize_error(graph, "ro", MiB) == "Image is read-only"
        await block_resize.run(graph, "nope", "f0", 3 * MiB)     # the node-name is enough
        assert os.path.getsize(path) == 3 * MiB
        await block_resize.run(graph, None, "f0", 1000)
        assert os.path.getsize(path) == 1000 and graph.find("f0").length() == 1024
        await block_resize.run(graph, None, "f0", 0)
        assert graph.find("f0").length() == 0


async def test_resize_luks(tmp_path):
    path = str(tmp_path / "l.luks")
    await trio.to_thread.run_sync(qmpd_luks_image(4 * MiB), path)
    payload = os.path.getsize(path) - 4 * MiB
    async with opened(luks_node("l0", path)) as (graph, [node]):
        await node.write(4 * MiB - 4096, b"\x5a" * 4096)
        await block_resize.run(graph, None, "l0", 32 * MiB)
        assert node.length() == 32 * MiB and os.path.getsize(path) == payload + 32 * MiB
        assert await node.read(4 * MiB - 4096, 4096) == b"\x5a" * 4096
        await node.write(32 * MiB - 512, b"\x6b" * 512)
        await block_resize.run(graph, None, "l0", 8 * MiB + 100)     # shrink, not aligned
        assert node.length() == 8 * MiB + 512
        assert os.path.getsize(path) == payload + 8 * MiB + 100
        assert await node.read(4 * MiB - 4096, 4096) == b"\x5a" * 4096
        assert await resize_error(graph, "l0", INT64_MAX) == \
            f"offset({INT64_MAX}) exceeds maximum({BDRV_MAX_LENGTH})"
        assert await resize_error(graph, "l0", BDRV_MAX_LENGTH) == \
            f"offset({BDRV_MAX_LENGTH + payload}) exceeds maximum({BDRV_MAX_LENGTH})"
        # resizing the file under it leaves the luks node's size (QEMU's total_sectors)
        leaf = node.file
        await block_resize.run(graph, None, leaf.name, payload + 2 * MiB)
        assert node.length() == 8 * MiB + 512 and leaf.length() == payload + 2 * MiB
    async with opened(luks_node("l0", path)) as (graph, [node]):
        assert node.length() == 2 * MiB


@pytest.mark.interop
@pytest.mark.parametrize("version,cluster_size", [("v3", 65536), ("v2", 512), ("v3", 2 * MiB)])
async def test_resize_qcow2_grow_and_shrink(tmp_path, version, cluster_size):
    size = 8 * MiB
    path = str(tmp_path / "r.qcow2")
    image = qcow2_image_opts(path, False)
    await trio.to_thread.run_sync(qemu_img_qcow2(size, cluster_size, version), path)
    rng = random.Random(1)
    data = rng.randbytes(size)
    async with opened(qcow2_node("q0", path)) as (graph, [node]):
        await node.write(0, data)
        big = os.path.getsize(path)
        assert await resize_error(graph, "q0", 32 * MiB + 1) == \
            "The new size must be a multiple of 512"
        assert await resize_error(graph, "q0", 1 << 62) == \
            "Failed to grow the L1 table: File too large"
        assert await resize_error(graph, node.file.name, MiB) == (
            f"Permission conflict on node '{node.file.name}': permissions 'resize' are both "
            "required by an unnamed block device (uses node "
            f"'{node.file.name}' as 'root' child) and unshared by node 'q0' (uses node "
            f"'{node.file.name}' as 'file' child).")
        await block_resize.run(graph, None, "q0", 3 * MiB + 1536)     # inside a cluster
        assert node.length() == 3 * MiB + 1536 and os.path.getsize(path) < big
        assert await read_all(node) == data[:3 * MiB + 1536]
        await block_resize.run(graph, None, "q0", 40 * MiB)
        assert node.length() == 40 * MiB
        tail = await node.read(3 * MiB + 1536, 40 * MiB - 3 * MiB - 1536)
        kept = -(-(3 * MiB + 1536) // cluster_size) * cluster_size - (3 * MiB + 1536)
        # as QEMU: the rest of the last partial cluster is not zeroed by the shrink
        assert tail[:kept] == data[3 * MiB + 1536:3 * MiB + 1536 + kept]
        assert tail[kept:] == bytes(len(tail) - kept)
        await node.write(40 * MiB - 512, b"\x77" * 512)
    await trio.to_thread.run_sync(lambda: qemu_img_check(image, secret=False))
    await trio.to_thread.run_sync(lambda: qemu_io(
        image, f"read -P 0x77 {40 * MiB - 512} 512", "read -P 0 16m 1m", secret=False))
    await trio.to_thread.run_sync(lambda: run_qemu_img(["snapshot", "-c", "s1", path]))
    async with opened(qcow2_node("q0", path)) as (graph, [node]):
        if version == "v2":
            assert await resize_error(graph, "q0", 64 * MiB) == \
                "Can't resize a v2 image which has snapshots"
        else:
            await block_resize.run(graph, None, "q0", MiB)
            assert await read_all(node) == data[:MiB]
    await trio.to_thread.run_sync(lambda: qemu_img_check(image, secret=False))


async def test_resize_qcow2_luks(tmp_path, templates):
    make = qmpd_qcow2_image(4 * MiB, encrypted=True)
    path = await trio.to_thread.run_sync(templates.copy, "enc", make, str(tmp_path / "e.qcow2"))
    async with opened(qcow2_node("q0", path, encrypted=True)) as (graph, [node]):
        await node.write(MiB, b"\x42" * 4096)
        await block_resize.run(graph, None, "q0", 64 * MiB)
        await node.write(64 * MiB - 4096, b"\x43" * 4096)
        await block_resize.run(graph, None, "q0", 2 * MiB)
        assert node.length() == 2 * MiB
    async with opened(qcow2_node("q0", path, encrypted=True, **{"read-only": True})) as (
            graph, [node]):
        assert node.length() == 2 * MiB
        assert await node.read(MiB, 4096) == b"\x42" * 4096
        assert await resize_error(graph, "q0", 8 * MiB + 1) == "Image is read-only"


# -- blockdev-create: inline files and sizes QEMU refuses ---------------------------------

async def create_error(options: dict) -> str:
    graph = BlockGraph(Secrets(SECRETS))
    try:
        with pytest.raises(QMPError) as info:
            await block_create.run(graph, options, NoProgress())
        return info.value.desc
    finally:
        await graph.close_all()


async def test_create_with_inline_file(tmp_path):
    for driver, extra in (("luks", {"key-secret": "s0", "iter-time": 10}),
                          ("qcow2", {"cluster-size": 4096}),
                          ("qcow2", {"encrypt": {"format": "luks", "key-secret": "s0",
                                                 "iter-time": 10}})):
        path = sparse_file(str(tmp_path / f"{driver}{len(extra)}.img"), 0)
        graph = BlockGraph(Secrets(SECRETS))
        try:
            await block_create.run(graph, {"driver": driver, "size": 4 * MiB,
                                           "file": file_ref(path), **extra}, NoProgress())
            assert graph.nodes == {}             # the inline file was closed again
        finally:
            await graph.close_all()
        opts = (luks_node("n0", path) if driver == "luks" else
                qcow2_node("n0", path, encrypted="encrypt" in extra))
        async with opened(opts) as (_, [node]):
            assert node.length() == 4 * MiB
            await node.write(MiB + 3, b"ok")
            assert await node.read(MiB + 3, 2) == b"ok"


HUGE_LUKS = [
    (INT64_MAX, "The requested file size is too large"),
    ((1 << 64) - 1, "The requested file size is too large"),
    (INT64_MAX - MiB, "The requested file size is too large"),
    (BDRV_MAX_LENGTH, f"offset({BDRV_MAX_LENGTH + 2068480}) exceeds maximum({BDRV_MAX_LENGTH})"),
]
HUGE_QCOW2 = [
    ({"size": 1 << 62}, "Could not resize image: Failed to grow the L1 table: File too large"),
    ({"size": (1 << 51) + 65536},
     "Could not resize image: Failed to grow the L1 table: File too large"),
    ({"size": 1 << 62, "cluster-size": 2 * MiB},
     "Could not resize image: Failed to grow the L1 table: File too large"),
    ({"size": 1 << 62, "cluster-size": 512},
     "Could not resize image: Failed to grow the L1 table: File too large"),
    ({"size": INT64_MAX - 511},
     f"Could not resize image: offset({INT64_MAX - 511}) exceeds maximum({BDRV_MAX_LENGTH})"),
    ({"size": (1 << 64) - 512}, "Could not resize image: Image size cannot be negative"),
    ({"size": (1 << 62) + 1}, "Image size must be a multiple of 512 bytes"),
    ({"size": 1 << 62, "encrypt": {"format": "luks", "key-secret": "nope"}},
     "Could not resize image: Failed to grow the L1 table: File too large"),
    ({"size": MiB, "encrypt": {"format": "luks"}},
     "Parameter 'encrypt.key-secret' is required for cipher"),
]


@pytest.mark.parametrize("size,text", HUGE_LUKS)
async def test_create_luks_huge_sizes(tmp_path, size, text):
    path = str(tmp_path / "h.img")
    with open(path, "wb") as f:
        f.write(b"old contents")
    assert await create_error({"driver": "luks", "file": file_ref(path), "size": size,
                               "key-secret": "s0", "iter-time": 10}) == text
    assert open(path, "rb").read() == b"old contents"     # QEMU writes nothing either


@pytest.mark.parametrize("options,text", HUGE_QCOW2)
async def test_create_qcow2_huge_sizes(tmp_path, options, text):
    path = str(tmp_path / "h.qcow2")
    with open(path, "wb") as f:
        f.write(b"old contents")
    assert await create_error({"driver": "qcow2", "file": file_ref(path), **options}) == text
    assert open(path, "rb").read() == b"old contents"


async def test_create_qcow2_largest_l1(tmp_path):
    """32 MiB of L1 table is QEMU's cap, and still allowed (4 PiB of 2^51 at 64 KiB)."""
    path = sparse_file(str(tmp_path / "l1.qcow2"), 0)
    graph = BlockGraph(Secrets(SECRETS))
    try:
        await block_create.run(graph, {"driver": "qcow2", "file": file_ref(path),
                                       "size": 1 << 51}, NoProgress())
    finally:
        await graph.close_all()
    async with opened(qcow2_node("q0", path)) as (_, [node]):
        assert node.length() == 1 << 51
        await node.write((1 << 51) - 512, b"\x01" * 512)
        assert await node.read((1 << 51) - 512, 512) == b"\x01" * 512


@pytest.mark.parametrize("size", [(1 << 64) - 1, 1 << 63])
async def test_create_file_huge_sizes(tmp_path, size):
    assert await create_error({"driver": "file", "filename": str(tmp_path / "f.img"),
                               "size": size}) == "Could not resize file: Invalid argument"
    assert os.path.getsize(tmp_path / "f.img") == 0


# -- format nodes over a luks node (the child's alignment is 512) ---------------------------

@pytest.mark.interop
async def test_raw_window_and_qcow2_over_luks(tmp_path, templates):
    """A parent calls its child's data path directly: a raw window at an odd
    offset and a qcow2 image inside a LUKS payload both reach the luks node
    unaligned, and it bounces them (QEMU aligns child requests the same way)."""
    path = str(tmp_path / "outer.luks")
    await trio.to_thread.run_sync(templates.copy, "luks16", qmpd_luks_image(16 * MiB), path)
    async with opened(luks_node("l0", path)) as (graph, [luks]):
        await graph_add(graph, {"driver": "raw", "node-name": "r0", "file": "l0",
                                "offset": 100, "size": 65536})
        raw = graph.find("r0")
        await raw.write(3, b"\x5a" * 1000)
        assert await luks.read(103, 1000) == b"\x5a" * 1000
        assert await raw.read(0, 1004) == (await luks.read(100, 3)) + b"\x5a" * 1000 + (
            await luks.read(1103, 1))
    luks_opts = f"driver=luks,key-secret=s0,file.filename={path}"
    await trio.to_thread.run_sync(lambda: qemu_io(
        f"driver=raw,offset=100,size=65536,file.{luks_opts.replace(',', ',file.')}",
        "read -P 0x5a 3 1000"))
    # a qcow2 image inside the LUKS payload, made and written by qmpd
    graph = BlockGraph(Secrets(SECRETS))
    try:
        await graph_add(graph, luks_node("l0", path))
        await block_create.run(graph, {"driver": "qcow2", "file": "l0", "size": 4 * MiB,
                                       "cluster-size": 4096}, NoProgress())
        await graph_add(graph, {"driver": "qcow2", "node-name": "q0", "file": "l0"})
        q0 = graph.find("q0")
        await q0.write(12345, b"\x6b" * 70000)
        await q0.write_zeroes(200000, 5000)
        await block_resize.run(graph, None, "q0", 8 * MiB)
        await q0.write(8 * MiB - 512, b"\x7c" * 512)
    finally:
        await graph.close_all()
    inner = f"driver=qcow2,file.{luks_opts.replace(',', ',file.')}"
    await trio.to_thread.run_sync(lambda: qemu_img_check(inner))
    await trio.to_thread.run_sync(lambda: qemu_io(
        inner, "read -P 0x6b 12345 70000", "read -P 0x7c 8388096 512", "read -P 0 0 12345"))


async def graph_add(graph, options: dict) -> None:
    from qmpd.block import blockdev
    await blockdev.add(graph, options)


@pytest.mark.interop
async def test_luks_over_raw_window(tmp_path, templates):
    """A LUKS volume stored at an offset inside a bigger file (raw offset/size)."""
    volume = await trio.to_thread.run_sync(templates.copy, "luks4", qmpd_luks_image(4 * MiB),
                                           str(tmp_path / "v.luks"))
    inner = open(volume, "rb").read()
    path = str(tmp_path / "disk.img")
    with open(path, "wb") as f:
        f.write(b"\xee" * MiB + inner + b"\xdd" * 4096)
    window = {"driver": "raw", "node-name": "r0", "offset": MiB, "size": len(inner),
              "file": file_ref(path)}
    async with opened(window, {"driver": "luks", "node-name": "l0", "key-secret": "s0",
                               "file": "r0"}) as (_, [_, luks]):
        assert luks.length() == 4 * MiB
        await luks.write(1001, b"\x3c" * 3000)
        assert await luks.read(1001, 3000) == b"\x3c" * 3000
    with open(path, "rb") as f:
        disk = f.read()
    assert disk[:MiB] == b"\xee" * MiB and disk[-4096:] == b"\xdd" * 4096
    await trio.to_thread.run_sync(lambda: qemu_io(
        f"driver=luks,key-secret=s0,file.driver=raw,file.offset={MiB},"
        f"file.size={len(inner)},file.file.filename={path}", "read -P 0x3c 1001 3000"))
