"""Detached LUKS headers (QEMU 9.0's luks ``header``; qmpd's feature detached-header).

cryptsetup is the oracle both ways, without device-mapper:

* *cryptsetup writes, qmpd reads.* ``luksFormat --header`` (LUKS1, LUKS2)
  and ``reencrypt --encrypt --header`` (LUKS2: known plaintext encrypted in
  place, the data segment at 0 of the data file).
* *qmpd writes, cryptsetup decrypts.* ``reencrypt --decrypt --header`` on
  copies. LUKS1's offline decryption needs device-mapper, so for LUKS1 the
  volume key cryptsetup itself reads from the header (``luksDump
  --dump-volume-key``) goes into a fresh LUKS2 detached header of the same
  cipher (LUKS1's sectors are LUKS2's 512-byte ones), which then decrypts.
* keys qmpd adds or erases: ``open --test-passphrase --header``; headers
  qmpd creates: ``luksDump`` and ``open --test-passphrase --header``.

Locks: qemu-io (without -U) is the other process opening the header image.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import trio

from qmpd.block import amend, blockdev, query
from qmpd.block import create as block_create
from qmpd.block.drivers.luks import LuksNode, created_header_length, luks_create_options
from qmpd.block.graph import BlockGraph
from qmpd.block.permissions import ALL, Perm, PermissionUse
from qmpd.errors import QMPError
from qmpd.schema import Schema
from tests.block.drivers.datapath_helpers import (
    PASSPHRASE,
    SECRETS,
    MiB,
    create_image,
    file_node,
    file_ref,
    opened,
)
from tests.block.graph_peer import NoProgress, Secrets
from tests.block.test_locks import held_bytes
from tests.oracles import cryptsetup_volume_key, require, run

PBKDF2 = ("--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000")
ARGON2ID = ("--pbkdf", "argon2id", "--pbkdf-memory", "32", "--pbkdf-force-iterations", "4",
            "--pbkdf-parallel", "1")
CIPHER = ("--cipher", "aes-xts-plain64", "--key-size", "512")
LUKS2_SMALL = ("--luks2-keyslots-size", "1M")
DATA_SIZE = 4 * MiB
OTHER = SECRETS["s1"]


def cryptsetup(*args: object, input: bytes | None = None) -> str:
    require("cryptsetup")
    return run(["cryptsetup", "--batch-mode", *map(str, args)], input=input).stdout.decode()


def key_file(tmp_path: Path, passphrase: str = PASSPHRASE) -> Path:
    path = tmp_path / f"key-{passphrase}"
    path.write_bytes(passphrase.encode())
    return path


def sized(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def luks_format(tmp_path: Path, luks_type: str, kdf=PBKDF2, *, sector_size: int = 512,
                extra: tuple = ()) -> tuple[Path, Path]:
    """(header, data): ``cryptsetup luksFormat --header`` (payload unwritten)."""
    header, data = sized(tmp_path / "hdr.img", 4 * MiB), sized(tmp_path / "data.img", DATA_SIZE)
    more = (*LUKS2_SMALL, "--sector-size", sector_size) if luks_type == "luks2" else ()
    cryptsetup("luksFormat", "--type", luks_type, "--header", header, "--key-file",
               key_file(tmp_path), *kdf, *CIPHER, *more, *extra, data)
    return header, data


def unlocks(header: Path, data: Path, passphrase: str) -> bool:
    require("cryptsetup")
    proc = run(["cryptsetup", "open", "--test-passphrase", "--header", str(header),
                "--key-file", "-", str(data)], input=passphrase.encode(), check=False)
    return proc.returncode == 0


def dump_version(header: Path) -> int:
    for line in cryptsetup("luksDump", header).splitlines():
        if line.startswith("Version:"):
            return int(line.split()[1])
    raise AssertionError("no version in luksDump")


def cryptsetup_plaintext(tmp_path: Path, header: Path, data: Path) -> bytes:
    """The data file as cryptsetup decrypts it (see the module docstring)."""
    work_header, work_data = tmp_path / "dec.hdr", tmp_path / "dec.img"
    shutil.copyfile(data, work_data)
    keys = key_file(tmp_path)
    if dump_version(header) == 2:
        shutil.copyfile(header, work_header)
    else:
        vk = tmp_path / "vk"
        vk.write_bytes(cryptsetup_volume_key(str(header), PASSPHRASE.encode()))
        sized(work_header, 4 * MiB)
        cryptsetup("luksFormat", "--type", "luks2", "--header", work_header, "--volume-key-file",
                   vk, *CIPHER, "--sector-size", 512, "--key-file", keys, *PBKDF2, *LUKS2_SMALL,
                   work_data)
    cryptsetup("reencrypt", "--decrypt", "--force-offline-reencrypt", "--key-file", keys,
               "--header", work_header, work_data)
    return work_data.read_bytes()


def detached(name: str, header: Path | str, data: Path | str, **extra) -> dict:
    def ref(x):
        return x if isinstance(x, (str, dict)) else file_ref(str(x))
    return {"driver": "luks", "node-name": name, "key-secret": "s0", "file": ref(data),
            "header": ref(header), **extra}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def amend_keys(graph: BlockGraph, node: str, **luks) -> None:
    options = {"driver": "luks", **luks}
    await amend.check_permissions(graph, node, options, "blockdev-amend")
    await amend.run(graph, node, options, False, NoProgress(), "blockdev-amend")


async def write_pattern(node, size: int) -> bytes:
    """Random data over the whole disk, plus an unaligned write; what it reads."""
    expected = bytearray(os.urandom(size))
    await node.write(0, bytes(expected))
    patch = os.urandom(777)
    await node.write(12345, patch)
    expected[12345:12345 + len(patch)] = patch
    await node.flush_all()
    return bytes(expected)


# -- cryptsetup's headers in qmpd ----------------------------------------------------------

@pytest.mark.interop
@pytest.mark.parametrize("sector_size", [512, 4096])
async def test_reads_what_cryptsetup_encrypted_behind_a_detached_header(tmp_path, sector_size):
    plaintext = os.urandom(DATA_SIZE)
    data = tmp_path / "data.img"
    data.write_bytes(plaintext)
    header = sized(tmp_path / "hdr.img", 4 * MiB)
    cryptsetup("reencrypt", "--encrypt", "--type", "luks2", "--force-offline-reencrypt",
               "--header", header, "--key-file", key_file(tmp_path), *PBKDF2, *CIPHER,
               *LUKS2_SMALL, "--sector-size", sector_size, data)
    assert data.read_bytes() != plaintext
    async with opened(detached("l", header, data, **{"read-only": True})) as (graph, [node]):
        assert isinstance(node, LuksNode) and node.header is not None
        assert node.length() == DATA_SIZE and node.request_alignment == sector_size
        assert await node.read(0, DATA_SIZE) == plaintext
        assert await node.read(100, 5000) == plaintext[100:5100]       # bounced


@pytest.mark.interop
@pytest.mark.parametrize("luks_type, kdf", [("luks1", PBKDF2), ("luks2", ARGON2ID)])
async def test_cryptsetup_decrypts_what_qmpd_wrote(tmp_path, luks_type, kdf):
    header, data = luks_format(tmp_path, luks_type, kdf)
    header_digest = digest(header)
    async with opened(detached("l", header, data)) as (graph, [node]):
        assert node.length() == DATA_SIZE        # the payload is all of the data file
        assert node.volume.payload_offset == 0
        expected = await write_pattern(node, DATA_SIZE)
        assert await node.read(0, DATA_SIZE) == expected
    assert digest(header) == header_digest       # guest writes never touch the header
    assert cryptsetup_plaintext(tmp_path, header, data) == expected


@pytest.mark.interop
async def test_luks1_header_payload_offset_applies_to_the_data_file(tmp_path):
    """QEMU 9.0 reads the payload offset from a detached header too; cryptsetup
    ``--offset`` puts the data there (8192 sectors: 4 MiB into the data file)."""
    header, data = luks_format(tmp_path, "luks1", extra=("--offset", 8192))
    sized(data, DATA_SIZE + 2 * MiB)
    async with opened(detached("l", header, data)) as (graph, [node]):
        assert node.volume.payload_offset == 4 * MiB
        assert node.length() == 2 * MiB
        expected = await write_pattern(node, 2 * MiB)
    plain = cryptsetup_plaintext_at_offset(tmp_path, header, data, 4 * MiB)
    assert plain == expected


def cryptsetup_plaintext_at_offset(tmp_path: Path, header: Path, data: Path, offset: int) -> bytes:
    payload = tmp_path / "payload.img"
    payload.write_bytes(data.read_bytes()[offset:])
    vk = tmp_path / "vk"
    vk.write_bytes(cryptsetup_volume_key(str(header), PASSPHRASE.encode()))
    work_header = sized(tmp_path / "w.hdr", 4 * MiB)
    keys = key_file(tmp_path)
    cryptsetup("luksFormat", "--type", "luks2", "--header", work_header, "--volume-key-file", vk,
               *CIPHER, "--sector-size", 512, "--key-file", keys, *PBKDF2, *LUKS2_SMALL, payload)
    cryptsetup("reencrypt", "--decrypt", "--force-offline-reencrypt", "--key-file", keys,
               "--header", work_header, payload)
    return payload.read_bytes()


@pytest.mark.interop
@pytest.mark.parametrize("luks_type, new_key", [
    ("luks1", {"iter-time": 10}),
    ("luks2", {"pbkdf": "argon2id", "pbkdf-memory": 32, "iter-time": 10, "pbkdf-parallel": 1}),
])
async def test_amend_writes_keys_to_the_header_cryptsetup_sees(tmp_path, luks_type, new_key):
    header, data = luks_format(tmp_path, luks_type)
    data_digest = digest(data)
    async with opened(detached("l", header, data)) as (graph, [node]):
        await amend_keys(graph, "l", state="active", **{"new-secret": "s1", "keyslot": 3},
                         **new_key)
        assert unlocks(header, data, OTHER) and unlocks(header, data, PASSPHRASE)
        await amend_keys(graph, "l", state="inactive", **{"old-secret": "s0"})
        assert unlocks(header, data, OTHER) and not unlocks(header, data, PASSPHRASE)
        slots = node.luks_info()["slots"]
        active = [slot.get("keyslot", i) for i, slot in enumerate(slots) if slot["active"]]
        assert active == [3]
        assert not node.updating_keys and node.file.parent_perms[1] == ALL
    assert digest(data) == data_digest           # keys live in the header alone
    # and the header reopens with the new key only
    graph = BlockGraph(Secrets({"s0": OTHER}))
    try:
        await blockdev.add(graph, detached("again", header, data))
    finally:
        await graph.close_all()


# -- qmpd's headers in cryptsetup ----------------------------------------------------------

CREATE_VERSIONS = [
    pytest.param({}, "Payload offset:\t0", id="luks1"),
    pytest.param({"luks-version": 2, "pbkdf": "pbkdf2"}, "offset: 0 [bytes]", id="luks2"),
]


@pytest.mark.interop
@pytest.mark.parametrize("version, dump_line", CREATE_VERSIONS)
async def test_created_header_passes_cryptsetup(tmp_path, version, dump_line):
    header, data = tmp_path / "hdr.img", tmp_path / "data.img"
    kept = os.urandom(MiB)
    data.write_bytes(kept)               # an existing volume: its data stays
    sized(header, 0)
    options = {"driver": "luks", "header": file_ref(str(header)), "file": file_ref(str(data)),
               "size": DATA_SIZE, "key-secret": "s0", "iter-time": 10, **version}
    await run_create(options)
    assert header.stat().st_size == created_header_length(
        luks_create_options(options, detached_header=True))
    assert data.stat().st_size == DATA_SIZE and data.read_bytes()[:MiB] == kept
    assert dump_line in cryptsetup("luksDump", header)
    assert unlocks(header, data, PASSPHRASE) and not unlocks(header, data, OTHER)
    async with opened(detached("l", header, data)) as (graph, [node]):
        assert node.length() == DATA_SIZE and node.volume.payload_offset == 0
        expected = await write_pattern(node, DATA_SIZE)
    assert cryptsetup_plaintext(tmp_path, header, data) == expected


# -- blockdev-create: QEMU 9.0's rules and texts -------------------------------------------

async def run_create(options: dict) -> None:
    graph = BlockGraph(Secrets(SECRETS))
    try:
        await block_create.run(graph, options, NoProgress())
    finally:
        await graph.close_all()


def create_options(tmp_path: Path, **extra) -> dict:
    header = sized(tmp_path / "hdr.img", 0)
    return {"driver": "luks", "header": file_ref(str(header)), "size": DATA_SIZE,
            "key-secret": "s0", "iter-time": 10, **extra}


async def test_create_header_alone_leaves_the_data_to_the_caller(tmp_path):
    options = create_options(tmp_path)
    await run_create(options)
    header = tmp_path / "hdr.img"
    assert header.stat().st_size == created_header_length(luks_create_options(options))
    data = sized(tmp_path / "data.img", 2 * MiB)
    async with opened(detached("l", header, data)) as (graph, [node]):
        assert node.length() == 2 * MiB and node.volume.header.payload_offset == 0


@pytest.mark.parametrize("extra, error", [
    ({"preallocation": "falloc"},
     "Parameter 'preallocation' requires 'file' to be specified for formatting LUKS disk"),
    ({"preallocation": "full"},
     "Parameter 'preallocation' requires 'file' to be specified for formatting LUKS disk"),
    ({"key-secret": "nope"}, "No secret with id 'nope'"),
    ({"luks-version": 2, "sector-size": 4096, "size": 4096 + 512},
     "The size of a LUKS2 image must be a multiple of its sector size (4096 bytes)"),
])
async def test_create_refusals_write_nothing(tmp_path, extra, error):
    options = create_options(tmp_path, **extra)
    with pytest.raises(QMPError) as info:
        await run_create(options)
    assert info.value.desc == error
    assert (tmp_path / "hdr.img").stat().st_size == 0


@pytest.mark.parametrize("extra, error", [
    ({"size": -1}, "File too large"),                       # > INT64_MAX: strerror(EFBIG)
    ({"size": (1 << 63) - 512}, "The requested file size is too large"),
    ({"preallocation": "metadata"}, "Operation not supported"),
])
async def test_create_payload_errors_come_after_the_header(tmp_path, extra, error):
    """QEMU 9.0 formats the header first, then sizes ``file`` with its quirky texts."""
    data = sized(tmp_path / "data.img", 4096)
    options = create_options(tmp_path, file=file_ref(str(data)), **extra)
    with pytest.raises(QMPError) as info:
        await run_create(options)
    assert info.value.desc == error
    assert (tmp_path / "hdr.img").read_bytes()[:6] == b"LUKS\xba\xbe"
    assert data.stat().st_size == 4096


async def test_create_preallocates_the_payload_file(tmp_path):
    data = tmp_path / "data.img"
    data.write_bytes(b"x" * 8192)
    await run_create(create_options(tmp_path, file=file_ref(str(data)), preallocation="full",
                                    size=2 * MiB))
    assert data.stat().st_size == 2 * MiB
    assert data.stat().st_blocks * 512 >= 2 * MiB
    assert data.read_bytes()[:8192] == b"x" * 8192


async def test_create_header_by_node_name(tmp_path):
    header, data = sized(tmp_path / "hdr.img", 0), sized(tmp_path / "data.img", 0)
    async with opened(file_node("h", str(header)), file_node("d", str(data))) as (graph, _):
        await block_create.run(graph, {"driver": "luks", "header": "h", "file": "d",
                                       "size": MiB, "key-secret": "s0", "iter-time": 10},
                               NoProgress())
        assert set(graph.nodes) == {"h", "d"}          # nothing left open by the job
        assert graph.find("h").parent_perms == (Perm(0), ALL)
        await blockdev.add(graph, detached("l", "h", "d"))
        assert graph.find("l").length() == MiB


def test_schema_file_is_optional_only_with_a_header():
    schema = Schema.load()
    base = {"job-id": "c"}
    luks = {"driver": "luks", "key-secret": "s0"}
    for options, error in [
        ({**luks}, "Parameter 'options.file' is missing"),                   # qsd 7.2's text
        ({**luks, "size": 1}, "Parameter 'options.file' is missing"),
        ({**luks, "file": "f"}, "Parameter 'options.size' is missing"),
        ({**luks, "header": "h"}, "Parameter 'options.size' is missing"),
        ({**luks, "header": 1, "size": 1},
         "Invalid parameter type for 'header', expected: BlockdevRef"),
    ]:
        with pytest.raises(QMPError) as info:
            schema.validate_arguments("blockdev-create", {**base, "options": options})
        assert info.value.desc == error, options
    schema.validate_arguments("blockdev-create", {**base, "options": {**luks, "header": "h",
                                                                      "size": 1}})
    schema.validate_arguments("blockdev-add", {"driver": "luks", "node-name": "l", "file": "f",
                                               "header": {"driver": "file", "filename": "x"}})
    with pytest.raises(QMPError) as info:
        schema.validate_arguments("blockdev-add", {"driver": "luks", "file": "f",
                                                   "header": {"driver": "file"}})
    assert info.value.desc == "Parameter 'header.filename' is missing"


# -- the graph: children, queries, delete, reopen, permissions, locks ----------------------

@pytest.fixture
def made(tmp_path) -> tuple[Path, Path]:
    """(header, data) made by qmpd's blockdev-create (LUKS1, cheap)."""
    header, data = sized(tmp_path / "hdr.img", 0), sized(tmp_path / "data.img", 0)
    trio.run(run_create, {"driver": "luks", "header": file_ref(str(header)),
                          "file": file_ref(str(data)), "size": MiB, "key-secret": "s0",
                          "iter-time": 10})
    return header, data


async def test_query_shows_the_header(made):
    header, data = made
    async with opened(detached("l", header, data)) as (graph, [node]):
        [info] = [i for i in await trio.to_thread.run_sync(query.named_block_nodes, graph)
                  if i["node-name"] == "l"]
        assert info["file"] == (
            f'json:{{"header": {{"driver": "file", "filename": "{header}"}}, "driver": "luks", '
            f'"file": {{"driver": "file", "filename": "{data}"}}, "key-secret": "s0"}}')
        assert info["image"]["filename"] == info["file"]
        assert info["image"]["virtual-size"] == MiB
        assert info["image"]["format-specific"]["data"]["payload-offset"] == 0
        assert {role: child.options["filename"] for role, child in node.children.items()} == \
            {"file": str(data), "header": str(header)}
        assert [u.child_role(node.header) for u in node.header.parents] == ["header"]


async def test_delete_closes_the_implicit_header_and_its_locks(made):
    header, data = made
    async with opened(detached("l", header, data)) as (graph, [node]):
        assert 100 in held_bytes(str(header))                 # consistent read
        await blockdev.delete(graph, "l")
        assert graph.nodes == {}
        assert held_bytes(str(header)) == set() and held_bytes(str(data)) == set()


async def test_header_by_reference_is_in_use_until_the_luks_node_goes(made):
    header, data = made
    async with opened(file_node("h", str(header)), file_node("d", str(data)),
                      detached("l", "h", "d")) as (graph, _):
        with pytest.raises(QMPError) as info:
            await blockdev.delete(graph, "h")
        assert info.value.desc == "Block device h is in use"
        await blockdev.delete(graph, "l")
        await blockdev.delete(graph, "h")
        assert set(graph.nodes) == {"d"}


@pytest.mark.parametrize("header_ref, error", [
    ("nope", "Cannot find device='nope' nor node-name='nope'"),
    ({"driver": "file", "filename": "/nonexistent/hdr"},
     "Could not open '/nonexistent/hdr': No such file or directory"),
])
async def test_failed_header_open_leaves_nothing(made, header_ref, error):
    header, data = made
    graph = BlockGraph(Secrets(SECRETS))
    try:
        with pytest.raises(QMPError) as info:
            await blockdev.add(graph, detached("l", header_ref, data))
        assert info.value.desc == error
        assert graph.nodes == {} and held_bytes(str(data)) == set()
    finally:
        await graph.close_all()


async def test_data_file_is_not_a_header(made):
    """A detached header's node opened without ``header``: no LUKS magic there."""
    header, data = made
    graph = BlockGraph(Secrets(SECRETS))
    try:
        with pytest.raises(QMPError) as info:
            await blockdev.add(graph, {"driver": "luks", "node-name": "l", "key-secret": "s0",
                                       "file": file_ref(str(data))})
        assert info.value.desc == "Volume is not in LUKS format"
        with pytest.raises(QMPError) as info:      # a wrong passphrase, through the header
            await blockdev.add(graph, {**detached("l", header, data), "key-secret": "s1"})
        assert info.value.desc == "Invalid password, cannot unlock any keyslot"
        assert graph.nodes == {} and held_bytes(str(header)) == set()
    finally:
        await graph.close_all()


async def test_reopen_keeps_or_refuses_the_header(made, tmp_path):
    header, data = made
    inline = detached("l", header, data, **{"read-only": True})
    async with opened(inline) as (graph, [node]):
        assert node.header.read_only
        with pytest.raises(QMPError) as info:
            await blockdev.reopen(graph, [{**inline, "read-only": False, "header": "other"}])
        assert info.value.desc == "Cannot change the option 'header'"
        assert node.read_only and node.header.read_only
        # the same inline header: reopened with its parent, read-write
        await blockdev.reopen(graph, [{**inline, "read-only": False}])
        assert not node.read_only and not node.header.read_only
        await amend_keys(graph, "l", state="active", **{"new-secret": "s1", "iter-time": 10})
        # left out: the header stays
        options = {k: v for k, v in inline.items() if k != "header"}
        await blockdev.reopen(graph, [{**options, "read-only": False}])
        assert node.header is not None
    plain = tmp_path / "plain.img"
    await create_image({"driver": "luks", "file": file_ref(str(plain)), "size": MiB,
                        "key-secret": "s0", "iter-time": 10})
    options = {"driver": "luks", "node-name": "p", "key-secret": "s0",
               "file": file_ref(str(plain))}
    async with opened(options) as (graph, [node]):
        with pytest.raises(QMPError) as info:
            await blockdev.reopen(graph, [{**options, "header": "p"}])
        assert info.value.desc == "Cannot change the option 'header'"


async def test_amend_refuses_a_read_only_header(made):
    header, data = made
    async with opened(file_node("h", str(header), **{"read-only": True}),
                      detached("l", "h", data)) as (graph, [_, node]):
        with pytest.raises(QMPError) as info:
            await amend_keys(graph, "l", state="active", **{"new-secret": "s1"})
        assert info.value.desc == "Block node is read-only"


async def test_key_update_permissions_go_to_the_header(made):
    header, data = made
    async with opened(detached("l", header, data)) as (graph, [node]):
        hdr, file = node.header, node.file
        assert node.child_perms(hdr) == node.child_perms(file) == (Perm.CONSISTENT_READ, ALL)
        node.updating_keys = True
        try:
            assert node.child_perms(hdr) == (Perm.CONSISTENT_READ | Perm.WRITE,
                                             ALL & ~(Perm.CONSISTENT_READ | Perm.WRITE))
            assert node.child_perms(file) == (Perm.CONSISTENT_READ, ALL)
        finally:
            node.updating_keys = False


QEMU_IO_READ_LOCKED = 'Failed to get "consistent read" lock'


def qemu_io(path: Path, *, read_only: bool) -> str:
    """qemu-io opening ``path`` (without -U), reading one sector: '' or its error."""
    require("qemu-io")
    args = ["qemu-io", "-f", "raw", *(["-r"] if read_only else []), "-c", "read 0 512",
            str(path)]
    proc = run(args, check=False)
    return "" if proc.returncode == 0 else proc.stderr.decode() + proc.stdout.decode()


@pytest.mark.interop
async def test_header_image_locks_against_qemu_io(made):
    header, data = made
    writer = PermissionUse("a test writer", "root", Perm.CONSISTENT_READ | Perm.WRITE, ALL)
    async with opened(detached("l", header, data)) as (graph, [node]):
        assert qemu_io(header, read_only=False) == ""          # as for file: all shared
        async with graph.lock:
            await graph.refresh(node, [writer])       # a writing parent of the luks node
            # the header child takes the parent's write too (QEMU's child_perms)
            assert {100, 101} <= held_bytes(str(header)) and 101 in held_bytes(str(data))
            await graph.release(node)
            node.updating_keys = True                   # what an amend holds while writing
            await graph.refresh(node.header)
        try:
            assert QEMU_IO_READ_LOCKED in qemu_io(header, read_only=True)
            assert QEMU_IO_READ_LOCKED in qemu_io(header, read_only=False)
            assert qemu_io(data, read_only=False) == ""    # the payload stays shared
        finally:
            async with graph.lock:
                node.updating_keys = False
                await graph.release(node.header)
        assert qemu_io(header, read_only=True) == ""


@pytest.mark.interop
async def test_amend_is_refused_while_qemu_io_writes_the_header(made):
    """The other way round: qemu-io holding the header image read-write keeps
    the amend from its exclusive permissions; holding the data file does not."""
    header, data = made
    require("qemu-io")
    async with opened(detached("l", header, data)) as (graph, [node]):
        for image, refused in ((header, True), (data, False)):
            proc = subprocess.Popen(["qemu-io", "-f", "raw", str(image)], stdin=subprocess.PIPE,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                deadline = time.monotonic() + 10
                while 101 not in held_bytes(str(image)):
                    assert time.monotonic() < deadline, "qemu-io did not lock the image"
                    await trio.sleep(0.02)
                if refused:
                    with pytest.raises(QMPError) as info:
                        await amend_keys(graph, "l", state="active",
                                         **{"new-secret": "s1", "iter-time": 10})
                    assert info.value.desc == 'Failed to get shared "consistent read" lock'
                else:
                    await amend_keys(graph, "l", state="active",
                                     **{"new-secret": "s1", "iter-time": 10})
            finally:
                proc.stdin.close()
                proc.wait(timeout=10)
        assert [s["active"] for s in node.luks_info()["slots"]][:2] == [True, True]


# -- the engine's keyword (sans-IO) --------------------------------------------------------

def test_engine_luks1_detached_header_in_memory():
    """create_volume(detached_header=True) records payload offset 0, which
    only a detached open accepts (QEMU 9.0's skipped overlap checks)."""
    from qmpd.crypto.errors import CryptoError
    from qmpd.crypto.luks import (
        LuksAmendOptions,
        LuksCreateOptions,
        MemoryImageIO,
        apply_amend,
        create_volume,
        header_length,
        open_volume,
        prepare_amend,
        read_header,
    )

    options = LuksCreateOptions(iter_time=1)
    io = MemoryImageIO()
    create_volume(io, b"pw", options, detached_header=True).close()
    assert len(io.data) == header_length(options)
    with pytest.raises(CryptoError, match="LUKS payload is overlapping with the header"):
        read_header(io)
    assert read_header(io, detached_header=True).payload_offset == 0
    volume = open_volume(io, b"pw", detached_header=True)
    try:
        assert volume.payload_offset == 0 and not volume.payload_in_file
        plan = prepare_amend(volume, io, LuksAmendOptions(
            state="active", new_secret=lambda: bytearray(b"new"),
            secret=lambda: bytearray(b"pw"), iter_time=1))
        apply_amend(plan, io)      # the amend's re-read takes the detached header too
    finally:
        volume.close()
    open_volume(io, b"new", detached_header=True).close()
