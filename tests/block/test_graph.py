"""BlockGraph: nodes, texts, query shape, create, amend, and sharing with QEMU."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import trio

from qmpd.block import amend as block_amend
from qmpd.block import blockdev, query
from qmpd.block import create as block_create
from qmpd.block.graph import BlockGraph
from qmpd.errors import QMPError
from tests.block.graph_peer import NoProgress, Secrets
from tests.block.test_locks import held_bytes
from tests.oracles import cryptsetup_unlocks, qemu_img_create_luks, require, run, run_qemu_img
from tests.qsd import start_qsd

SECRETS = {"s0": "pw", "s1": "pw2", "s2": "pw3"}
AMEND_ADD = {"driver": "luks", "state": "active", "new-secret": "s1", "iter-time": 10}


@pytest.fixture(scope="module")
def luks_template(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tpl") / "raw.luks")
    qemu_img_create_luks(path, "pw", size="4M")
    return path


@pytest.fixture(scope="module")
def qcow2_template(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tpl") / "enc.qcow2")
    qemu_img_create_luks(path, "pw", size="4M", fmt="qcow2")
    return path


@pytest.fixture
def raw_img(tmp_path, luks_template):
    path = str(tmp_path / "raw.luks")
    shutil.copy(luks_template, path)
    return path


@pytest.fixture
def qcow2_img(tmp_path, qcow2_template):
    path = str(tmp_path / "enc.qcow2")
    shutil.copy(qcow2_template, path)
    return path


@pytest.fixture
async def graph():
    g = BlockGraph(Secrets(SECRETS))
    yield g
    await g.close_all()


def luks(name, path, secret="s0", **extra):
    return {"driver": "luks", "node-name": name, "key-secret": secret,
            "file": {"driver": "file", "filename": path}, **extra}


async def error_of(coro) -> str:
    with pytest.raises(QMPError) as info:
        await coro
    return info.value.desc


async def test_add_errors_have_qemu_texts(graph, raw_img, tmp_path):
    assert await error_of(blockdev.add(graph, {"driver": "file", "filename": raw_img})) == \
        "'node-name' must be specified for the root node"
    assert await error_of(blockdev.add(graph, {"driver": "file", "node-name": "1bad",
                                     "filename": raw_img})) == "Invalid node-name: '1bad'"
    missing = str(tmp_path / "nope")
    assert await error_of(blockdev.add(graph, {"driver": "file", "node-name": "f",
                                     "filename": missing})) == \
        f"Could not open '{missing}': No such file or directory"
    assert await error_of(blockdev.add(graph, {"driver": "luks", "node-name": "l",
                                     "file": {"driver": "file", "filename": raw_img}})) == \
        "Parameter 'key-secret' is required for cipher"
    assert await error_of(blockdev.add(graph, luks("l", raw_img, "s1"))) == \
        "Invalid password, cannot unlock any keyslot"
    assert await error_of(blockdev.add(graph, luks("l", raw_img, "zz"))) == "No secret with id 'zz'"
    assert await error_of(blockdev.add(graph, {"driver": "qcow2", "node-name": "q",
                                     "file": {"driver": "file", "filename": raw_img}})) == \
        "Image is not in qcow2 format"
    assert await error_of(blockdev.add(graph, {"driver": "luks", "node-name": "l", "key-secret": "s0",
                                     "file": "f9"})) == "Cannot find device='f9' nor node-name='f9'"
    # failed adds leave nothing open or locked
    assert query.named_block_nodes(graph) == []
    assert held_bytes(raw_img) == set()


async def test_nodes_query_and_delete(graph, raw_img):
    await blockdev.add(graph, {"driver": "file", "node-name": "f0", "filename": raw_img})
    assert await error_of(blockdev.add(graph, {"driver": "file", "node-name": "f0",
                                     "filename": raw_img})) == "Duplicate nodes with node-name='f0'"
    await blockdev.add(graph, {"driver": "luks", "node-name": "l0", "key-secret": "s0", "file": "f0"})
    nodes = query.named_block_nodes(graph)
    assert [n["node-name"] for n in nodes] == ["l0", "f0"]
    l0 = nodes[0]
    assert l0["drv"] == "luks" and l0["encrypted"] and not l0["ro"] and l0["file"].startswith("json:")
    image = l0["image"]
    assert image["virtual-size"] == 4 << 20
    data = image["format-specific"]["data"]
    assert image["format-specific"]["type"] == "luks"
    assert data["payload-offset"] == 2068480 and len(data["slots"]) == 8
    assert data["slots"][0]["active"] and not data["slots"][1]["active"]
    assert nodes[1]["image"]["virtual-size"] == os.path.getsize(raw_img)
    assert held_bytes(raw_img) == {100}
    assert await error_of(blockdev.delete(graph, "f0")) == "Block device f0 is in use"
    assert await error_of(blockdev.delete(graph, "zz")) == "Failed to find node with node-name='zz'"
    await blockdev.delete(graph, "l0")
    await blockdev.delete(graph, "f0")
    assert held_bytes(raw_img) == set()


async def test_implicit_child_named_and_owned(graph, qcow2_img):
    await blockdev.add(graph, {"driver": "qcow2", "node-name": "q0", "file": {"driver": "file", "filename": qcow2_img},
                     "encrypt": {"format": "luks", "key-secret": "s0"}})
    names = [n["node-name"] for n in query.named_block_nodes(graph)]
    assert names[0] == "q0" and names[1].startswith("#block")
    assert await error_of(blockdev.delete(graph, names[1])) == f"Node {names[1]} is not owned by the monitor"
    assert held_bytes(qcow2_img) == {100, 101, 103, 201, 203}
    info = query.named_block_nodes(graph)[0]["image"]
    assert info["format-specific"]["data"]["encrypt"]["format"] == "luks"
    assert info["virtual-size"] == 4 << 20 and info["cluster-size"] == 65536


async def test_qcow2_without_secret(graph, qcow2_img):
    assert await error_of(blockdev.add(graph, {"driver": "qcow2", "node-name": "q0",
                                     "file": {"driver": "file", "filename": qcow2_img}})) == \
        "Parameter 'encrypt.key-secret' is required for cipher"


async def test_second_qcow2_parent_conflicts(graph, tmp_path):
    path = str(tmp_path / "plain.qcow2")
    run_qemu_img(["create", "-q", "-f", "qcow2", path, "1M"])
    await blockdev.add(graph, {"driver": "file", "node-name": "f0", "filename": path})
    await blockdev.add(graph, {"driver": "qcow2", "node-name": "q0", "file": "f0"})
    assert await error_of(blockdev.add(graph, {"driver": "qcow2", "node-name": "q1", "file": "f0"})) == (
        "Permission conflict on node 'f0': permissions 'write, resize' are both required by "
        "node 'q0' (uses node 'f0' as 'file' child) and unshared by node 'q1' "
        "(uses node 'f0' as 'file' child).")


@pytest.mark.interop
async def test_amend_raw_luks_and_locks_released(graph, raw_img):
    await blockdev.add(graph, luks("l0", raw_img))
    await block_amend.run(graph, "l0", AMEND_ADD, False, NoProgress(), "blockdev-amend")
    assert held_bytes(raw_img) == {100}
    assert cryptsetup_unlocks(raw_img, b"pw2") and cryptsetup_unlocks(raw_img, b"pw")
    slots = query.named_block_nodes(graph)[0]["image"]["format-specific"]["data"]["slots"]
    assert slots[1]["active"]


@pytest.mark.interop
async def test_amend_qcow2(graph, qcow2_img):
    await blockdev.add(graph, {"driver": "qcow2", "node-name": "q0", "file": {"driver": "file", "filename": qcow2_img},
                     "encrypt": {"format": "luks", "key-secret": "s0"}})
    await block_amend.run(graph, "q0", {"driver": "qcow2", "encrypt": {"format": "luks", **{
        k: v for k, v in AMEND_ADD.items() if k != "driver"}}}, False, NoProgress(), "blockdev-amend")
    await graph.close_all()
    proc = run_qemu_img(["info", "--object", "secret,id=s0,data=pw2", "--image-opts",
                         f"driver=qcow2,encrypt.key-secret=s0,file.filename={qcow2_img}"])
    assert b"active: true" in proc.stdout


async def test_amend_refusals(graph, raw_img):
    await blockdev.add(graph, {"driver": "file", "node-name": "f0", "filename": raw_img, "read-only": True})
    await blockdev.add(graph, {"driver": "luks", "node-name": "l0", "key-secret": "s0", "file": "f0"})
    assert await error_of(block_amend.run(graph, "zz", AMEND_ADD, False, NoProgress(), "x-blockdev-amend")) == \
        "Cannot find device='' nor node-name='zz'"
    assert await error_of(block_amend.run(graph, "l0", {"driver": "qcow2"}, False, NoProgress(),
                                      "x-blockdev-amend")) == \
        "x-blockdev-amend doesn't support changing the block driver"
    assert await error_of(block_amend.run(graph, "l0", AMEND_ADD, False, NoProgress(), "blockdev-amend")) == \
        "Block node is read-only"
    await blockdev.reopen(graph, [{"driver": "file", "node-name": "f0", "filename": raw_img,
                         "read-only": False}])
    await block_amend.run(graph, "l0", AMEND_ADD, False, NoProgress(), "blockdev-amend")
    await blockdev.reopen(graph, [{"driver": "file", "node-name": "f0", "filename": raw_img,
                         "read-only": True}])
    assert query.named_block_nodes(graph)[1]["ro"] is True


async def test_amend_conflicts_with_second_reader_in_process(graph, raw_img):
    await blockdev.add(graph, {"driver": "file", "node-name": "f1", "filename": raw_img})
    await blockdev.add(graph, {"driver": "luks", "node-name": "l0", "key-secret": "s0", "file": "f1"})
    await blockdev.add(graph, {"driver": "luks", "node-name": "l1", "key-secret": "s0", "file": "f1"})
    expected = ("Permission conflict on node 'f1': permissions 'consistent read' are both "
                "required by node 'l1' (uses node 'f1' as 'file' child) and unshared by node "
                "'l0' (uses node 'f1' as 'file' child).")
    assert await error_of(block_amend.check_permissions(graph, "l0", AMEND_ADD, "blockdev-amend")) == expected
    assert await error_of(block_amend.run(graph, "l0", AMEND_ADD, False, NoProgress(), "blockdev-amend")) == expected
    assert held_bytes(raw_img) == {100}


async def test_cancel_before_apply_leaves_image_untouched(graph, raw_img):
    await blockdev.add(graph, luks("l0", raw_img))
    before = open(raw_img, "rb").read()
    with trio.move_on_after(0.001):
        await block_amend.run(graph, "l0", {**AMEND_ADD, "iter-time": 200}, False, NoProgress(),
                          "blockdev-amend")
    assert open(raw_img, "rb").read() == before
    assert held_bytes(raw_img) == {100}


@pytest.mark.interop
async def test_create_qcow2_passes_qemu_img_check_and_qemu_io(graph, tmp_path):
    require("qemu-io")
    path = str(tmp_path / "new.qcow2")
    await block_create.run(graph, {"driver": "file", "filename": path, "size": 0}, NoProgress())
    await blockdev.add(graph, {"driver": "file", "node-name": "f0", "filename": path})
    await block_create.run(graph, {"driver": "qcow2", "file": "f0", "size": 8 << 20, "cluster-size": 4096,
                        "encrypt": {"format": "luks", "key-secret": "s0", "iter-time": 10}},
                       NoProgress())
    await blockdev.delete(graph, "f0")
    opts = f"driver=qcow2,encrypt.key-secret=s0,file.filename={path}"
    proc = run_qemu_img(["check", "--object", "secret,id=s0,data=pw", "--image-opts", opts])
    assert b"No errors were found" in proc.stdout
    proc = run(["qemu-io", "--object", "secret,id=s0,data=pw", "--image-opts", opts,
                "-c", "write -P 0x5a 0 1M", "-c", "read -P 0x5a 0 1M"])
    assert b"read 1048576/1048576" in proc.stdout
    proc = run_qemu_img(["check", "--object", "secret,id=s0,data=pw", "--image-opts", opts])
    assert b"No errors were found" in proc.stdout


@pytest.mark.interop
async def test_create_raw_luks_opens_in_qemu(graph, tmp_path):
    path = str(tmp_path / "new.luks")
    await block_create.run(graph, {"driver": "file", "filename": path, "size": 0}, NoProgress())
    await blockdev.add(graph, {"driver": "file", "node-name": "f0", "filename": path})
    await block_create.run(graph, {"driver": "luks", "file": "f0", "size": 1 << 20, "key-secret": "s0",
                        "iter-time": 10}, NoProgress())
    await blockdev.delete(graph, "f0")
    assert cryptsetup_unlocks(path, b"pw")
    proc = run_qemu_img(["info", "--output=json", "--object", "secret,id=s0,data=pw",
                         "--image-opts", f"driver=luks,key-secret=s0,file.filename={path}"])
    assert json.loads(proc.stdout)["virtual-size"] == 1 << 20


# -- across processes ----------------------------------------------------------------

class Peer:
    """Another BlockGraph in a subprocess (tests/block/graph_peer.py)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.block.graph_peer", json.dumps(SECRETS)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))

    def send(self, *command) -> str:
        self.proc.stdin.write(json.dumps(list(command)) + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.send("close")
        self.proc.wait(timeout=30)


@pytest.fixture
def peer():
    p = Peer()
    yield p
    p.close()


async def test_iotest_296_two_processes(graph, peer, raw_img):
    assert peer.send("add", luks("l0", raw_img)) == "ok"
    await blockdev.add(graph, luks("l0", raw_img))
    # both hold the image: neither can update keys
    assert await error_of(block_amend.run(graph, "l0", AMEND_ADD, False, NoProgress(), "blockdev-amend")) == \
        'Failed to get shared "consistent read" lock'
    assert peer.send("amend", "l0", AMEND_ADD) == 'ERR Failed to get shared "consistent read" lock'
    # one closes: the other can
    assert peer.send("close") == "ok"
    await block_amend.run(graph, "l0", AMEND_ADD, False, NoProgress(), "blockdev-amend")


async def test_iotest_296_read_only_opener_blocks_amend(graph, peer, raw_img):
    assert peer.send("add", luks("l0", raw_img, **{"read-only": True})) == "ok"
    await blockdev.add(graph, luks("l0", raw_img))
    assert await error_of(block_amend.run(graph, "l0", AMEND_ADD, False, NoProgress(), "blockdev-amend")) == \
        'Failed to get shared "consistent read" lock'
    assert peer.send("amend", "l0", AMEND_ADD) == "ERR Block node is read-only"


# -- beside qemu-storage-daemon --------------------------------------------------------

class Qsd:
    def __init__(self, tmp_path, *blockdevs: str) -> None:
        require("qemu-storage-daemon")
        self.sock = str(tmp_path / "qsd.sock")
        args = ["--object", "secret,id=s0,data=pw"]
        for spec in blockdevs:
            args += ["--blockdev", spec]
        self.log = str(tmp_path / "qsd.log")
        self.proc = start_qsd(self.sock, args, log_path=self.log)

    def wait_for_locks(self, path: str) -> set[int]:
        """qsd opens its --blockdev nodes after creating the socket: wait for them."""
        deadline = time.monotonic() + 20
        while not held_bytes(path):
            assert self.proc.poll() is None, open(self.log).read()
            assert time.monotonic() < deadline, "qemu-storage-daemon did not lock the image"
            time.sleep(0.02)
        time.sleep(0.1)
        return held_bytes(path)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.mark.interop
async def test_qsd_holding_qcow2_refuses_our_write(graph, tmp_path, qcow2_img):
    qsd = Qsd(tmp_path, f"driver=file,node-name=f0,filename={qcow2_img}",
              "driver=qcow2,node-name=q0,file=f0,encrypt.format=luks,encrypt.key-secret=s0")
    try:
        assert qsd.wait_for_locks(qcow2_img) == {100, 101, 103, 201, 203}
        opts = {"driver": "qcow2", "node-name": "q0", "encrypt": {"format": "luks", "key-secret": "s0"},
                "file": {"driver": "file", "filename": qcow2_img}}
        assert await error_of(blockdev.add(graph, opts)) == 'Failed to get "write" lock'
        # read-only with force-share: allowed, like qemu-img -U
        await blockdev.add(graph, {**opts, "read-only": True, "file": {
            "driver": "file", "filename": qcow2_img, "force-share": True, "read-only": True}})
    finally:
        qsd.stop()


@pytest.mark.interop
async def test_qsd_raw_luks_blocks_our_amend_and_we_block_its_open(graph, tmp_path, raw_img):
    qsd = Qsd(tmp_path, f"driver=file,node-name=f0,filename={raw_img}",
              "driver=luks,node-name=l0,file=f0,key-secret=s0")
    try:
        assert qsd.wait_for_locks(raw_img) == {100}
        await blockdev.add(graph, luks("l0", raw_img))
        assert await error_of(block_amend.run(graph, "l0", AMEND_ADD, False, NoProgress(), "blockdev-amend")) == \
            'Failed to get shared "consistent read" lock'
    finally:
        qsd.stop()
    await block_amend.run(graph, "l0", AMEND_ADD, False, NoProgress(), "blockdev-amend")
    assert cryptsetup_unlocks(raw_img, b"pw2")


@pytest.mark.interop
async def test_our_qcow2_refuses_qemu_img_writers(graph, qcow2_img):
    await blockdev.add(graph, {"driver": "qcow2", "node-name": "q0", "encrypt": {"format": "luks", "key-secret": "s0"},
                     "file": {"driver": "file", "filename": qcow2_img}})
    proc = run(["qemu-io", "--object", "secret,id=s0,data=pw", "--image-opts",
                f"driver=qcow2,encrypt.key-secret=s0,file.filename={qcow2_img}",
                "-c", "read 0 512"], check=False)
    assert proc.returncode != 0
    assert b'Failed to get "write" lock' in proc.stderr
    proc = run_qemu_img(["info", "-U", qcow2_img])
    assert b"file format: qcow2" in proc.stdout
