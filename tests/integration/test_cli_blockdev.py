"""--object and --blockdev on the command line open nodes at start-up, in
qemu-storage-daemon's syntax (dotted key=value, or JSON)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qmpd.crypto.luks import LuksCreateOptions, MemoryImageIO, create_volume


def make_luks_image(path, passphrase: bytes, size: int = 1 << 20) -> None:
    io = MemoryImageIO()
    create_volume(io, passphrase, LuksCreateOptions(iter_time=10)).close()
    data = bytes(io.data)
    with open(path, "wb") as f:
        f.write(data + bytes(size))


def query_nodes(sock: str) -> list[dict]:
    from qemu.qmp.legacy import QEMUMonitorProtocol

    qmp = QEMUMonitorProtocol(sock)
    qmp.connect(negotiate=True)
    try:
        return qmp.cmd("query-named-block-nodes", flat=True)
    finally:
        qmp.close()


def test_dotted_blockdev_opens_a_luks_node(qmpd_daemon, tmp_path):
    image = tmp_path / "disk.luks"
    make_luks_image(image, b"pw,with,commas")
    sock, _ = qmpd_daemon(
        "--object", "secret,id=s0,data=pw,,with,,commas",
        "--blockdev", f"driver=luks,node-name=disk,key-secret=s0,read-only=on,"
                      f"file.driver=file,file.filename={image},file.read-only=on")
    nodes = {n["node-name"]: n for n in query_nodes(sock)}
    assert nodes["disk"]["drv"] == "luks"
    assert nodes["disk"]["ro"] is True
    assert nodes["disk"]["image"]["format-specific"]["type"] == "luks"


def test_json_blockdev_and_file_reference(qmpd_daemon, tmp_path):
    image = tmp_path / "disk.luks"
    make_luks_image(image, b"pw")
    sock, _ = qmpd_daemon(
        "--object", '{"qom-type": "secret", "id": "s0", "data": "pw"}',
        "--blockdev", json.dumps({"driver": "file", "node-name": "f0", "filename": str(image)}),
        "--blockdev", '{"driver": "luks", "node-name": "disk", "key-secret": "s0", "file": "f0"}')
    names = {n["node-name"] for n in query_nodes(sock)}
    assert {"f0", "disk"} <= names


@pytest.mark.parametrize("blockdev, text", [
    ("driver=luks,node-name=d,key-secret=s0,file.driver=file,file.filename=/nonexistent/x",
     "Could not open '/nonexistent/x': No such file or directory"),
    ("driver=luks,node-name=d,key-secret=nope,file.driver=file,file.filename={image}",
     "No secret with id 'nope'"),
    ("driver=luks,node-name=d,key-secret=s0,file.driver=file,file.filename={image},read-only=maybe",
     "read-only"),
])
def test_bad_blockdev_stops_start_up_with_qemu_text(tmp_path, blockdev, text):
    image = tmp_path / "disk.luks"
    make_luks_image(image, b"pw")
    out = subprocess.run([sys.executable, "-m", "qmpd", "--socket", str(tmp_path / "s"),
                          "--object", "secret,id=s0,data=pw",
                          "--blockdev", blockdev.format(image=image)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert text in out.stderr
    assert not (tmp_path / "s").exists()
