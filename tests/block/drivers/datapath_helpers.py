"""Shared by the data-path tests: nodes opened through a BlockGraph, images,
and a model disk that random operations are checked against.

A test opens its nodes the way a client does (``blockdev.add`` on a
BlockGraph with a secrets lookup) and drives the async Node API under trio:
read, write, write_zeroes(may_unmap), discard, flush_all, get_block_status.
The :class:`Model` is a bytearray of what the disk must read, with a mask of
bytes whose contents are unspecified (a LUKS discard: advisory, the bytes
may or may not change), so that a model test never asserts more than the
node promises.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator

import trio
from hypothesis import HealthCheck, settings, strategies as st

from qmpd.block import blockdev
from qmpd.block import create as block_create
from qmpd.block.graph import BlockGraph
from qmpd.block.node import Node
from tests.block.graph_peer import NoProgress, Secrets
from tests.oracles import require, run, run_qemu_img

PASSPHRASE = "pw"
SECRETS = {"s0": PASSPHRASE, "s1": "other"}
SECRET_ARG = f"secret,id=s0,data={PASSPHRASE}"
KiB, MiB = 1 << 10, 1 << 20


def model_settings(examples: int) -> settings:
    """Few, reproducible examples (the suite's time budget); soak tests ask more."""
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


# -- node options ------------------------------------------------------------------------

def file_ref(path: str, **extra) -> dict:
    return {"driver": "file", "filename": str(path), **extra}


def file_node(name: str, path: str, **extra) -> dict:
    return {"node-name": name, **file_ref(path, **extra)}


def luks_node(name: str, path: str, *, file_extra: dict | None = None, **extra) -> dict:
    return {"driver": "luks", "node-name": name, "key-secret": "s0",
            "file": file_ref(path, **(file_extra or {})), **extra}


def qcow2_node(name: str, path: str, *, encrypted: bool = False,
               file_extra: dict | None = None, **extra) -> dict:
    opts = {"driver": "qcow2", "node-name": name, "file": file_ref(path, **(file_extra or {})),
            **extra}
    if encrypted:
        opts["encrypt"] = {"format": "luks", "key-secret": "s0"}
    return opts


def raw_node(name: str, path: str, *, offset: int | None = None, size: int | None = None,
             file_extra: dict | None = None) -> dict:
    opts: dict = {"driver": "raw", "node-name": name, "file": file_ref(path, **(file_extra or {}))}
    if offset is not None:
        opts["offset"] = offset
    if size is not None:
        opts["size"] = size
    return opts


@asynccontextmanager
async def opened(*options: dict) -> AsyncIterator[tuple[BlockGraph, list[Node]]]:
    """A graph with these nodes added in order; every node closed at the end."""
    graph = BlockGraph(Secrets(SECRETS))
    try:
        nodes = []
        for opts in options:
            await blockdev.add(graph, opts)
            nodes.append(graph.find(opts["node-name"]))
        yield graph, nodes
    finally:
        await graph.close_all()


async def create_image(options: dict) -> None:
    """blockdev-create through qmpd itself (file, luks, qcow2 over a new file)."""
    graph = BlockGraph(Secrets(SECRETS))
    try:
        if options["driver"] != "file":
            file = options["file"]
            await block_create.run(graph, {"driver": "file", "filename": file["filename"],
                                           "size": 0}, NoProgress())
        await block_create.run(graph, options, NoProgress())
    finally:
        await graph.close_all()


class Templates:
    """Images made once per module, copied for each example."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="datapath-tpl-")
        self._made: dict[str, str] = {}

    def get(self, key: str, make) -> str:
        if key not in self._made:
            path = os.path.join(self.dir, f"t{len(self._made)}.img")
            make(path)
            self._made[key] = path
        return self._made[key]

    def copy(self, key: str, make, dest: str) -> str:
        shutil.copyfile(self.get(key, make), dest)
        return dest

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def qmpd_luks_image(size: int, **luks_opts):
    """A maker for a raw LUKS image written by qmpd's blockdev-create."""
    def make(path: str) -> None:
        trio.run(create_image, {"driver": "luks", "file": file_ref(path), "size": size,
                                "key-secret": "s0", "iter-time": 10, **luks_opts})
    return make


def qmpd_qcow2_image(size: int, *, cluster_size: int = 65536, version: str = "v3",
                     encrypted: bool = False):
    def make(path: str) -> None:
        opts: dict = {"driver": "qcow2", "file": file_ref(path), "size": size,
                      "cluster-size": cluster_size, "version": version}
        if encrypted:
            opts["encrypt"] = {"format": "luks", "key-secret": "s0", "iter-time": 10}
        trio.run(create_image, opts)
    return make


# -- the model ---------------------------------------------------------------------------

@dataclass
class Model:
    """What the disk must read; ``unknown`` marks bytes of unspecified contents."""

    data: bytearray
    unknown: bytearray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.unknown is None:
            self.unknown = bytearray(len(self.data))

    def write(self, offset: int, payload: bytes) -> None:
        self.data[offset:offset + len(payload)] = payload
        self.unknown[offset:offset + len(payload)] = bytes(len(payload))

    def zero(self, offset: int, length: int) -> None:
        self.write(offset, bytes(length))

    def forget(self, offset: int, length: int) -> None:
        self.unknown[offset:offset + length] = b"\1" * length

    def check(self, offset: int, got: bytes) -> None:
        want = self.data[offset:offset + len(got)]
        if got == want:
            return
        mask = self.unknown[offset:offset + len(got)]
        bad = [i for i in range(len(got)) if got[i] != want[i] and not mask[i]]
        assert not bad, (f"byte {offset + bad[0]:#x} reads {got[bad[0]]:#04x}, model "
                         f"{want[bad[0]]:#04x} ({len(bad)} bytes differ, first run at "
                         f"{offset + bad[0]}..{offset + bad[-1]})")


#: How a node's discard shows in what it reads afterwards.
DISCARD_KEEPS = "keeps"          # nothing changes (file with discard=ignore)
DISCARD_ZEROES = "zeroes"        # the range reads as zeroes (file punch-hole)
DISCARD_UNSPECIFIED = "unspecified"   # anything may be read (LUKS: advisory)


def discard_clusters(cluster_size: int):
    """qcow2: the clusters wholly inside the range read as zeroes, the rest keeps."""
    def effect(model: Model, offset: int, length: int) -> None:
        first = -(-offset // cluster_size) * cluster_size
        last = (offset + length) // cluster_size * cluster_size
        if last > first:
            model.zero(first, last - first)
    return effect


def apply_discard(effect, model: Model, offset: int, length: int) -> None:
    if effect == DISCARD_ZEROES:
        model.zero(offset, length)
    elif effect == DISCARD_UNSPECIFIED:
        model.forget(offset, length)
    elif callable(effect):
        effect(model, offset, length)


def operations(size: int, *, boundaries: tuple[int, ...] = (512, 4096, 65536),
               max_length: int = 192 * KiB, count: int = 24, hot: int = 384 * KiB):
    """Random operations on a disk of ``size`` bytes: offsets at, near or far
    from the alignment boundaries, lengths from 1 up. Most requests fall in
    the first ``hot`` bytes (and the last ones), so that a few examples
    still overlap each other."""
    hot = min(hot, size)

    def offset_at(unit: int, limit: int):
        return st.tuples(st.integers(0, max(0, limit // unit - 1)),
                         st.sampled_from([0, 0, 1, -1, 7, 511, -511])).map(
            lambda t: min(max(0, t[0] * unit + t[1]), size - 1))

    offsets = st.one_of(st.integers(0, hot - 1), st.integers(max(0, size - hot), size - 1),
                        *[offset_at(u, hot) for u in boundaries],
                        *[offset_at(u, size) for u in boundaries], st.integers(0, size - 1))
    ranges = offsets.flatmap(lambda off: st.tuples(
        st.just(off), st.one_of(st.integers(1, min(max_length, size - off)),
                                st.sampled_from(sorted({1, 511, 512, 513, 4096, 65536,
                                                        *boundaries,
                                                        *[2 * u + 1 for u in boundaries]})).map(
                                    lambda n: min(n, size - off)))))
    op = st.one_of(
        st.tuples(st.just("write"), ranges, st.integers(0, 2**32 - 1)),
        st.tuples(st.just("write"), ranges, st.integers(0, 2**32 - 1)),
        st.tuples(st.just("zero"), ranges, st.booleans()),
        st.tuples(st.just("discard"), ranges),
        st.tuples(st.just("read"), ranges),
        st.tuples(st.just("reads"), st.lists(ranges, min_size=1, max_size=6)),
        st.tuples(st.just("status"), ranges),
        st.tuples(st.just("flush")),
        st.tuples(st.just("reopen")),
    )
    return st.lists(op, min_size=min(6, count), max_size=count)


async def apply(node: Node, model: Model, op: tuple, discard_effect) -> None:
    """Run one operation on the node and on the model."""
    kind = op[0]
    if kind == "write":
        (offset, length), seed = op[1], op[2]
        payload = random.Random(seed).randbytes(length)
        await node.write(offset, payload)
        model.write(offset, payload)
    elif kind == "zero":
        (offset, length), may_unmap = op[1], op[2]
        await node.write_zeroes(offset, length, may_unmap=may_unmap)
        model.zero(offset, length)
    elif kind == "discard":
        offset, length = op[1]
        await node.discard(offset, length)
        apply_discard(discard_effect, model, offset, length)
    elif kind == "read":
        offset, length = op[1]
        model.check(offset, await node.read(offset, length))
    elif kind == "reads":   # a burst, as the NBD server hands it over
        ranges = op[1]
        done = node.read_now(ranges)
        if done is None:        # something had to wait: one by one
            done = [await node.read(offset, length) for offset, length in ranges]
        assert len(done) == len(ranges)
        for (offset, _), data in zip(ranges, done, strict=True):
            model.check(offset, data)
    elif kind == "status":
        offset, length = op[1]
        now = node.block_status_now(offset, length)
        if now is not None:
            check_status(model, offset, length, now)
        check_status(model, offset, length, await node.get_block_status(offset, length))
    elif kind == "flush":
        await node.flush_all()


def check_status(model: Model, offset: int, length: int, extents) -> None:
    """Extents cover at least one byte, at most the range; a run said to be
    zero reads as zeroes in the model."""
    total = sum(e.length for e in extents)
    assert 0 < total <= length and all(e.length > 0 for e in extents)
    pos = offset
    for e in extents:
        if e.zero:
            model.check(pos, bytes(e.length))
        pos += e.length


async def read_all(node: Node, chunk: int = 4 * MiB) -> bytes:
    out = bytearray()
    size = node.length()
    for pos in range(0, size, chunk):
        out += await node.read(pos, min(chunk, size - pos))
    return bytes(out)


async def run_model(options: list[dict], ops: list[tuple], discard_effect,
                    initial: bytes | None = None, prefill: int = 0) -> Model:
    """Open the nodes, play ``ops`` on the last one, reopen on "reopen" (the
    graph closed and built again), and check every byte at the end.
    ``prefill``: random data is written over the first bytes first, so that
    the zeroes and discards of a few examples have something to remove."""
    async with opened(*options) as (graph, nodes):
        node = nodes[-1]
        model = Model(bytearray(initial if initial is not None else await read_all(node)))
        if prefill:
            await apply(node, model, ("write", (0, min(prefill, node.length())), len(ops)),
                        discard_effect)
    for start, end in _segments(ops):
        async with opened(*options) as (graph, nodes):
            node = nodes[-1]
            assert node.length() == len(model.data)
            for op in ops[start:end]:
                await apply(node, model, op, discard_effect)
            model.check(0, await read_all(node))
    return model


def _segments(ops: list[tuple]) -> list[tuple[int, int]]:
    out, start = [], 0
    for i, op in enumerate(ops):
        if op[0] == "reopen":
            out.append((start, i))
            start = i + 1
    out.append((start, len(ops)))
    return out


# -- the reference tools ---------------------------------------------------------------

def qemu_io(image_opts: str, *commands: str, secret: bool = True) -> str:
    """qemu-io over --image-opts; fails on any error or pattern mismatch."""
    require("qemu-io")
    args = ["qemu-io"] + (["--object", SECRET_ARG] if secret else [])
    args += ["--image-opts", image_opts]
    for command in commands:
        args += ["-c", command]
    proc = run(args)
    out = proc.stdout.decode(errors="replace")
    assert "Pattern verification failed" not in out and " failed" not in out, out
    return out


def luks_image_opts(path: str) -> str:
    return f"driver=luks,key-secret=s0,file.filename={path}"


def qcow2_image_opts(path: str, encrypted: bool) -> str:
    opts = f"driver=qcow2,file.filename={path}"
    return opts + ",encrypt.key-secret=s0" if encrypted else opts


def qemu_img_convert_raw(image_opts: str, out: str, secret: bool = True) -> bytes:
    args = ["convert"] + (["--object", SECRET_ARG] if secret else [])
    run_qemu_img(args + ["--image-opts", image_opts, "-O", "raw", out])
    with open(out, "rb") as f:
        return f.read()


def qemu_img_check(image_opts: str, secret: bool = True) -> None:
    args = ["check"] + (["--object", SECRET_ARG] if secret else [])
    run_qemu_img(args + ["--image-opts", image_opts])


def sparse_file(path: str, size: int) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


def allocated_bytes(path: str) -> int:
    return os.stat(path).st_blocks * 512


