"""exec-oob end to end: an out-of-band command overtakes a slow in-band one.

QEMU 7.2's command subset has no allow-oob command, so the daemon is
started with a copy of the schema (--schema) in which query-version allows
OOB; everything else is the shipped daemon.
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

from qmpd.crypto.luks import LuksCreateOptions, MemoryImageIO, create_volume

SCHEMA = Path(__file__).resolve().parents[2] / "schema"


def oob_schema(tmp_path: Path) -> Path:
    target = tmp_path / "schema"
    shutil.copytree(SCHEMA, target)
    control = target / "control.json"
    entities = json.loads(control.read_text())
    for entity in entities:
        if entity.get("command") == "query-version":
            entity["allow-oob"] = True
    control.write_text(json.dumps(entities))
    return target


def read_messages(f, count: int) -> list[dict]:
    return [json.loads(f.readline()) for _ in range(count)]


def test_exec_oob_overtakes_a_slow_inband_command(qmpd_daemon, tmp_path):
    image = tmp_path / "slow.luks"
    io = MemoryImageIO()
    create_volume(io, b"pw", LuksCreateOptions(iter_time=400)).close()  # ~0.4 s to unlock
    image.write_bytes(bytes(io.data) + bytes(1 << 20))
    sock, _ = qmpd_daemon("--schema", str(oob_schema(tmp_path)),
                          "--object", "secret,id=s0,data=pw")
    client = socket.socket(socket.AF_UNIX)
    client.connect(sock)
    client.settimeout(30)
    f = client.makefile("rb")
    f.readline()
    client.sendall(b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}')
    assert read_messages(f, 1) == [{"return": {}}]
    client.sendall(json.dumps({"execute": "blockdev-add", "id": "slow", "arguments": {
        "driver": "luks", "node-name": "d", "key-secret": "s0",
        "file": {"driver": "file", "filename": str(image)}}}).encode()
        + b'{"execute": "query-version", "id": "inband"}'
        + b'{"exec-oob": "query-version", "id": "oob"}')
    ids = [m.get("id") for m in read_messages(f, 3)]
    # OOB is answered at once; in-band replies keep their order behind the slow one.
    assert ids == ["oob", "slow", "inband"]
    client.close()


def test_introspection_shows_allow_oob_of_the_schema(qmpd_daemon, tmp_path):
    from qemu.qmp.legacy import QEMUMonitorProtocol

    sock, _ = qmpd_daemon("--schema", str(oob_schema(tmp_path)))
    qmp = QEMUMonitorProtocol(sock)
    qmp.connect(negotiate=True)
    schema = qmp.cmd("query-qmp-schema")
    qmp.close()
    commands = {e["name"]: e for e in schema if e["meta-type"] == "command"}
    assert commands["query-version"].get("allow-oob") is True
    assert "allow-oob" not in commands["query-jobs"]
