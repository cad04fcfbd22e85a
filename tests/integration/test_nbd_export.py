"""qmpd exporting real images over NBD to real clients (a ``qmpd`` subprocess).

qemu-img, qemu-io, nbdinfo, nbdcopy, fio's nbd engine and libnbd's Python
binding use the export; what they wrote is read back from the image file
by qemu-io after the daemon has stopped (raw LUKS with several ciphers,
qcow2+LUKS, a plain file node, raw over a file), and qcow2 images pass
qemu-img check. The image locks are checked against qsd's behaviour.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.integration.exports_helpers import (Qmp, export_args, image_opts, libnbd,
                                               luks_image, luks_node_args, nbd_uri, plain_image,
                                               qemu_io, random_file, rmtree, short_tmp,
                                               wait_for_socket)
from tests.oracles import require, run, run_qemu_img
from tests.processes import stop

pytestmark = pytest.mark.interop

MiB = 1 << 20


@pytest.fixture
def wd():
    path = short_tmp()
    yield path
    rmtree(path)


def serve(qmpd_daemon, wd: str, node_args: list[str], node: str = "l0",
          writable: bool = True, extra: str = ""):
    """qmpd with the node and an export 'disk' on wd/nbd.sock: (qmp socket, uri, process)."""
    nbd_sock = os.path.join(wd, "nbd.sock")
    qmp_sock, proc = qmpd_daemon(*node_args, *export_args(nbd_sock, node, writable=writable,
                                                          extra=extra), workdir=wd)
    wait_for_socket(nbd_sock)     # the QMP socket listens before start-up has finished
    return qmp_sock, nbd_uri(nbd_sock), proc


# -- the image kinds ------------------------------------------------------------------

KINDS = {
    # name: (image format, qemu-img -o extras, node driver)
    "luks-aes-256-xts": ("luks", "", "luks"),
    "luks-aes-128-cbc-essiv": ("luks", "cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,"
                               "ivgen-hash-alg=sha256", "luks"),
    "luks-aes-128-xts-sha1": ("luks", "cipher-alg=aes-128,cipher-mode=xts,hash-alg=sha1",
                              "luks"),
    "luks-twofish-128-cbc": ("luks", "cipher-alg=twofish-128,cipher-mode=cbc,"
                             "ivgen-alg=plain64", "luks"),
    "qcow2-luks": ("qcow2", "", "qcow2"),
    "file": ("raw", "", "file"),
    "raw-over-file": ("raw", "", "raw"),
}


def make_kind(wd: str, kind: str, size: str = "16M") -> tuple[str, list[str], str | None, str]:
    """(image path, daemon node args, passphrase, qemu format) for one kind."""
    fmt, extra, driver = KINDS[kind]
    path = os.path.join(wd, "disk.img")
    if driver in ("luks", "qcow2"):
        luks_image(path, "pw0", size=size, fmt=fmt, extra=extra)
        return path, luks_node_args(path, "pw0", fmt=fmt), "pw0", fmt
    plain_image(path, "raw", size)
    if driver == "file":
        return path, ["--blockdev", f"driver=file,node-name=l0,filename={path}"], None, "raw"
    return path, ["--blockdev", f"driver=raw,node-name=l0,file.driver=file,"
                                f"file.filename={path}"], None, "raw"


WRITES = ("write -P 0x5a 0 1M", "write -P 0xa5 3M 512k", "write -P 0x11 8M 1M",
          "write -z 8M 1M", "write -P 0x22 12M 64k", "discard 12M 64k", "flush")
CHECKS = ("read -P 0x5a 0 1M", "read -P 0xa5 3M 512k", "read -P 0 8M 1M")
#: Never written: zeroes, except in a raw LUKS payload (a sparse file decrypts to noise).
UNWRITTEN = "read -P 0 1M 2M"
#: Pure-Python ciphers (no `cryptography` backend) are correct but slow: soak only.
SLOW_KINDS = {"luks-twofish-128-cbc"}


@pytest.mark.parametrize("kind", [pytest.param(k, marks=[pytest.mark.soak] if k in SLOW_KINDS
                                               else []) for k in KINDS])
def test_written_over_nbd_reads_back_from_the_image(qmpd_daemon, wd, kind) -> None:
    path, node_args, passphrase, fmt = make_kind(wd, kind)
    checks = CHECKS if KINDS[kind][2] == "luks" else CHECKS + (UNWRITTEN,)
    _qmp, uri, proc = serve(qmpd_daemon, wd, node_args)
    qemu_io(["-f", "raw", uri], *WRITES)
    qemu_io(["-f", "raw", uri], *checks)          # over NBD, a fresh connection
    stop(proc)
    assert proc.returncode == 0
    qemu_io(image_opts(path, passphrase, fmt), *checks)
    if fmt == "qcow2":
        run_qemu_img(["check", *image_opts(path, passphrase, fmt)])


def test_qemu_img_info_convert_compare(qmpd_daemon, wd) -> None:
    path, node_args, _pw, _fmt = make_kind(wd, "luks-aes-256-xts")
    _qmp, uri, _proc = serve(qmpd_daemon, wd, node_args)
    info = json.loads(run_qemu_img(["info", "--output=json", uri]).stdout)
    assert info["virtual-size"] == 16 * MiB and info["format"] == "raw"
    src = os.path.join(wd, "src.raw")
    random_file(src, 16 * MiB, seed=7)
    run_qemu_img(["convert", "-n", "-f", "raw", "-O", "raw", src, uri])
    run_qemu_img(["compare", "-f", "raw", "-F", "raw", src, uri])
    out = os.path.join(wd, "out.qcow2")
    run_qemu_img(["convert", "-f", "raw", "-O", "qcow2", uri, out])
    run_qemu_img(["compare", "-f", "raw", "-F", "qcow2", src, out])
    proc = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", os.path.join(wd, "disk.img"),
                uri], check=False)
    assert proc.returncode == 1      # the image file holds ciphertext


def test_qemu_io_requests_on_qcow2_luks(qmpd_daemon, wd) -> None:
    path, node_args, pw, fmt = make_kind(wd, "qcow2-luks")
    _qmp, uri, proc = serve(qmpd_daemon, wd, node_args)
    out = qemu_io(["-f", "raw", uri], "write -P 0x31 0 64k", "write -P 0x32 100k 3k",
                  "aio_write -P 0x33 1M 128k", "aio_flush", "read -P 0x32 100k 3k",
                  "write -z -u 2M 1M", "read -P 0 2M 1M", "write -f -P 0x34 5M 4k",
                  "discard 0 64k", "read -P 0 0 64k", "readv -P 0x33 1M 64k 64k",
                  "flush").stdout.decode()
    assert "wrote 131072/131072" in out
    stop(proc)
    qemu_io(image_opts(path, pw, fmt), "read -P 0 0 64k", "read -P 0x32 100k 3k",
            "read -P 0x33 1M 128k", "read -P 0 2M 1M", "read -P 0x34 5M 4k")
    run_qemu_img(["check", *image_opts(path, pw, fmt)])


def test_nbdinfo_list_json_map(qmpd_daemon, wd) -> None:
    require("nbdinfo")
    path = plain_image(os.path.join(wd, "a.img"), "raw", "8M")
    nbd_sock = os.path.join(wd, "nbd.sock")
    qmp_sock, _proc = qmpd_daemon("--blockdev", f"driver=file,node-name=f0,filename={path}",
                                  "--nbd-server", f"addr.type=unix,addr.path={nbd_sock}",
                                  workdir=wd)
    wait_for_socket(nbd_sock)
    qmp = Qmp(qmp_sock)
    qmp.ok("block-export-add", {"type": "nbd", "id": "e0", "node-name": "f0", "name": "disk",
                                "description": "the disk", "writable": True,
                                "allocation-depth": True})
    qmp.ok("block-export-add", {"type": "nbd", "id": "e1", "node-name": "f0",
                                "name": "ro"})
    listing = run(["nbdinfo", "--list", "--json", f"nbd+unix:///?socket={nbd_sock}"]).stdout
    exports = {e["export-name"]: e for e in json.loads(listing)["exports"]}
    assert set(exports) == {"disk", "ro"}
    assert exports["disk"]["description"] == "the disk"
    assert exports["disk"]["is_read_only"] is False and exports["ro"]["is_read_only"] is True
    assert exports["disk"]["export-size"] == 8 * MiB
    assert "qemu:allocation-depth" in exports["disk"]["contexts"]
    assert "qemu:allocation-depth" not in exports["ro"]["contexts"]
    assert exports["disk"]["block_size_minimum"] in (1, 512)
    assert exports["disk"]["block_size_preferred"] == 4096
    assert exports["disk"]["block_size_maximum"] == 32 * MiB

    uri = nbd_uri(nbd_sock)
    qemu_io(["-f", "raw", uri], "write -P 0x7 1M 1M")
    one = json.loads(run(["nbdinfo", "--json", uri]).stdout)["exports"][0]
    assert one["export-name"] == "disk" and one["can_flush"] and one["can_trim"]
    mapping = json.loads(run(["nbdinfo", "--map", "--json", uri]).stdout)
    data = [m for m in mapping if m["type"] & 1 == 0]
    assert any(m["offset"] <= 1 * MiB and m["offset"] + m["length"] >= 2 * MiB for m in data)
    assert sum(m["length"] for m in mapping) == 8 * MiB
    holes = [m for m in mapping if m["type"] & 1]
    assert holes, mapping                      # the unwritten rest of a sparse file
    depth = json.loads(run(["nbdinfo", "--map=qemu:allocation-depth", "--json", uri]).stdout)
    assert sum(m["length"] for m in depth) == 8 * MiB
    assert {m["type"] for m in depth} <= {0, 1}
    assert any(m["type"] == 1 for m in depth)   # allocated in this (top) layer
    qmp.close()


def test_nbdcopy_multi_conn_in_and_out(qmpd_daemon, wd) -> None:
    require("nbdcopy")
    path, node_args, pw, fmt = make_kind(wd, "luks-aes-256-xts", size="32M")
    _qmp, uri, proc = serve(qmpd_daemon, wd, node_args)
    src = os.path.join(wd, "src.raw")
    data = random_file(src, 32 * MiB, seed=3)
    run(["nbdcopy", "--connections=4", "--requests=16", src, uri])
    out = os.path.join(wd, "out.raw")
    run(["nbdcopy", "--connections=4", uri, out])
    assert Path(out).read_bytes() == data
    stop(proc)
    back = os.path.join(wd, "back.raw")
    run_qemu_img(["convert", *image_opts(path, pw, fmt), "-O", "raw", back])
    assert Path(back).read_bytes() == data


def test_fio_nbd_engine(qmpd_daemon, wd) -> None:
    require("fio")
    _path, node_args, _pw, _fmt = make_kind(wd, "luks-aes-256-xts")
    _qmp, uri, _proc = serve(qmpd_daemon, wd, node_args)
    proc = run(["fio", "--name=nbd", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
                "--bs=4k", "--size=8M", "--iodepth=16", "--verify=crc32c", "--do_verify=1",
                "--output-format=json"], timeout=120)
    result = json.loads(proc.stdout[proc.stdout.index(b"{"):])
    job = result["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 8 * MiB
    assert job["read"]["io_bytes"] == 8 * MiB      # the verify pass


LIBNBD_SCRIPT = r"""
import sys, nbd, random
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(sys.argv[1])
size = h.get_size()
assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
rnd = random.Random(5)
blocks = {}
cookies = []
bufs = []
for i, n in enumerate(rnd.sample(range(size // 65536), 200)):   # many in flight at once
    off = n * 65536
    data = bytes([i % 251 + 1]) * 65536
    blocks[off] = data
    cookies.append(h.aio_pwrite(data, off))
while h.aio_in_flight() > 0:
    h.poll(-1)
for c in cookies:
    assert h.aio_command_completed(c)
h.flush()
reads = []
for off in blocks:
    buf = nbd.Buffer(65536)
    reads.append((off, buf, h.aio_pread(buf, off)))
peak = h.aio_in_flight()
while h.aio_in_flight() > 0:
    h.poll(-1)
for off, buf, c in reads:
    assert h.aio_command_completed(c)
    assert buf.to_bytearray() == blocks[off], off
extents = []
def on_extents(context, offset, entries, err):
    extents.append((context, offset, list(entries)))
    return 0
h.block_status(size, 0, on_extents)
ctx, off, entries = extents[0]
assert ctx == nbd.CONTEXT_BASE_ALLOCATION and off == 0
total = sum(entries[0::2])
print(len(blocks), peak, total, size)
h.shutdown()
"""


def test_libnbd_aio_and_block_status(qmpd_daemon, wd) -> None:
    _path, node_args, _pw, _fmt = make_kind(wd, "file", size="32M")
    _qmp, uri, _proc = serve(qmpd_daemon, wd, node_args)
    blocks, peak, total, size = map(int, libnbd(LIBNBD_SCRIPT, uri).split())
    assert size == 32 * MiB and 0 < total <= size
    assert blocks > 100 and peak > 16    # libnbd queued more than the server's 16 at once


# -- image locks, as qsd takes them -----------------------------------------------------

def _lock_messages(path: str, passphrase: str | None, fmt: str) -> tuple[str, str]:
    """(read-write open, read-only open) of the image by qemu-io while it is exported."""
    def text(proc) -> str:     # without the timing line
        out = (proc.stdout + proc.stderr).decode(errors="replace")
        return "".join(line for line in out.splitlines(True) if "ops;" not in line)

    rw = run(["qemu-io", *image_opts(path, passphrase, fmt), "-c", "read 0 512"], check=False)
    ro = run(["qemu-io", "-r", *image_opts(path, passphrase, fmt), "-c", "read 0 512"],
             check=False)
    return text(rw), text(ro)


def test_writable_qcow2_export_keeps_other_processes_out(qmpd_daemon, wd) -> None:
    path, node_args, pw, fmt = make_kind(wd, "qcow2-luks")
    serve(qmpd_daemon, wd, node_args)
    rw, ro = _lock_messages(path, pw, fmt)
    assert 'Failed to get "write" lock' in rw, rw
    assert 'Failed to get shared "write" lock' in ro, ro


def _qsd_lock_messages(wd: str, path: str, pw: str | None, fmt: str, node_args: list[str]
                       ) -> tuple[str, str]:
    require("qemu-storage-daemon")
    from tests.tools.qsd_transcript import start_qsd
    qsd_dir = os.path.join(wd, "qsd")
    os.mkdir(qsd_dir)
    args = node_args + export_args(os.path.join(qsd_dir, "nbd.sock"))
    proc = start_qsd(os.path.join(qsd_dir, "qmp.sock"), args, qsd_dir)
    try:
        Qmp(os.path.join(qsd_dir, "qmp.sock")).close()       # up and serving
        return _lock_messages(path, pw, fmt)
    finally:
        stop(proc)


def test_raw_luks_export_shares_write_as_qsd_does(qmpd_daemon, wd) -> None:
    path, node_args, pw, fmt = make_kind(wd, "luks-aes-256-xts")
    _qmp, _uri, proc = serve(qmpd_daemon, wd, node_args)
    ours = _lock_messages(path, pw, fmt)
    stop(proc)
    theirs = _qsd_lock_messages(wd, path, pw, fmt, node_args)
    assert "read 512/512" in ours[0] and "read 512/512" in ours[1], ours
    assert ours == theirs


def test_qcow2_locks_match_qsd(qmpd_daemon, wd) -> None:
    path, node_args, pw, fmt = make_kind(wd, "qcow2-luks")
    _qmp, _uri, proc = serve(qmpd_daemon, wd, node_args)
    ours = _lock_messages(path, pw, fmt)
    stop(proc)
    theirs = _qsd_lock_messages(wd, path, pw, fmt, node_args)
    assert ours == theirs


def test_export_survives_client_that_vanishes(qmpd_daemon, wd) -> None:
    """A client killed mid-stream leaves the export usable for the next."""
    _path, node_args, _pw, _fmt = make_kind(wd, "file")
    qmp_sock, uri, _proc = serve(qmpd_daemon, wd, node_args)
    victim = subprocess.Popen(["qemu-io", "-f", "raw", uri, "-c", "write -P 1 0 16M"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    victim.kill()
    victim.wait()
    qemu_io(["-f", "raw", uri], "write -P 2 0 1M", "read -P 2 0 1M")
    qmp = Qmp(qmp_sock)
    assert qmp.ok("query-block-exports") == [
        {"id": "e0", "type": "nbd", "node-name": "l0", "shutting-down": False}]
    qmp.close()
