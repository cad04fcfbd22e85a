"""Detached LUKS headers through a qmpd process over QMP: blockdev-create,
blockdev-add, query-named-block-nodes, x-blockdev-amend, blockdev-del, and the
schema's feature flag; cryptsetup checks the header qmpd made and amended."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.block.test_locks import held_bytes
from tests.integration.test_iotest_295 import Monitor
from tests.oracles import require, run

pytestmark = pytest.mark.interop

MiB = 1 << 20


def unlocks(header: Path, data: Path, passphrase: str) -> bool:
    require("cryptsetup")
    proc = run(["cryptsetup", "open", "--test-passphrase", "--header", str(header),
                "--key-file", "-", str(data)], input=passphrase.encode(), check=False)
    return proc.returncode == 0


def job_error(mon: Monitor, job_id: str) -> str | None:
    statuses = mon.job_statuses(job_id)
    assert statuses[-1] == "concluded", statuses
    [job] = [j for j in mon.ok("query-jobs") if j["id"] == job_id]
    mon.ok("job-dismiss", {"id": job_id})
    return job.get("error")


def test_detached_header_over_qmp(qmpd_daemon, tmp_path):
    require("cryptsetup")
    header, data = tmp_path / "hdr.img", tmp_path / "data.img"
    header.write_bytes(b"")
    data.write_bytes(b"")
    sock, _ = qmpd_daemon()
    mon = Monitor(sock)
    try:
        mon.ok("object-add", {"qom-type": "secret", "id": "s0", "data": "pw0"})
        mon.ok("object-add", {"qom-type": "secret", "id": "s1", "data": "pw1"})
        # a LUKS1 client without header sees qsd 7.2's answer, synchronously
        assert mon.error("blockdev-create", {"job-id": "c0", "options": {
            "driver": "luks", "size": MiB, "key-secret": "s0"}}) == \
            "Parameter 'options.file' is missing"
        hdr_ref = {"driver": "file", "filename": str(header)}
        data_ref = {"driver": "file", "filename": str(data)}
        mon.ok("blockdev-create", {"job-id": "c1", "options": {
            "driver": "luks", "header": hdr_ref, "size": MiB, "key-secret": "s0",
            "iter-time": 10, "preallocation": "falloc"}})
        assert job_error(mon, "c1") == ("Parameter 'preallocation' requires 'file' to be "
                                        "specified for formatting LUKS disk")
        mon.ok("blockdev-create", {"job-id": "c2", "options": {
            "driver": "luks", "header": hdr_ref, "file": data_ref, "size": MiB,
            "key-secret": "s0", "iter-time": 10}})
        assert job_error(mon, "c2") is None
        assert data.stat().st_size == MiB and unlocks(header, data, "pw0")

        mon.ok("blockdev-add", {"driver": "luks", "node-name": "l", "key-secret": "s0",
                                "file": data_ref, "header": hdr_ref})
        [info] = [i for i in mon.ok("query-named-block-nodes") if i["node-name"] == "l"]
        assert info["file"].startswith('json:{"header": {"driver": "file", "filename": ')
        assert info["image"]["virtual-size"] == MiB
        assert info["image"]["format-specific"]["data"]["payload-offset"] == 0

        mon.ok("x-blockdev-amend", {"job-id": "a1", "node-name": "l", "options": {
            "driver": "luks", "state": "active", "new-secret": "s1", "iter-time": 10}})
        assert job_error(mon, "a1") is None
        assert unlocks(header, data, "pw1")

        mon.ok("blockdev-del", {"node-name": "l"})
        assert held_bytes(str(header)) == set() and held_bytes(str(data)) == set()

        schema = mon.ok("query-qmp-schema")
        marked = [m["name"] for e in schema if e["meta-type"] == "object"
                  for m in e["members"] if "detached-header" in m.get("features", ())]
        assert marked == ["header", "header"]
    finally:
        mon.close()
