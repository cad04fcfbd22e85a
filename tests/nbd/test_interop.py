"""NbdServer against the real clients: nbdinfo, qemu-img, qemu-io, nbdcopy,
fio and libnbd, over a unix socket, TCP, and TLS.

The server runs in a thread over in-memory exports (tests/nbd/memory.py);
every test checks what the client saw against what the export holds.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest
import trio

from tests.nbd.certs import make_certs, server_context
from tests.nbd.memory import Catalog, MemoryExport
from tests.nbd.serve import ServedCatalog
from tests.oracles import require, run

pytestmark = pytest.mark.interop

SIZE = 8 << 20
DATA_END = 1 << 20
LIBNBD_CLIENT = Path(__file__).with_name("libnbd_client.py")


class SlowFirstBlock(MemoryExport):
    """Reads of the first 4 KiB take a while: later requests overtake them."""

    async def read(self, offset, length):
        if offset == 0 and length == 4096:
            await trio.sleep(1.0)
        return await super().read(offset, length)


def make_catalog(cls=MemoryExport) -> Catalog:
    image = random.Random(1).randbytes(DATA_END) + bytes(SIZE - DATA_END)
    return Catalog(
        cls.from_image("disk", image, DATA_END, allocation_depth=True),
        cls.from_image("ro", image, DATA_END, writable=False, description="the same, read-only"))


@pytest.fixture
def served(tmp_path):
    with ServedCatalog(make_catalog(), unix=str(tmp_path / "nbd.sock"), tcp=True) as s:
        yield s


def _json(args: list[str]) -> dict:
    return json.loads(run(args).stdout)


def test_nbdinfo_json(served) -> None:
    require("nbdinfo")
    (disk,) = _json(["nbdinfo", "--json", served.uri("disk")])["exports"]
    assert disk["export-name"] == "disk" and disk["export-size"] == SIZE
    assert disk["is_read_only"] is False and disk["can_multi_conn"] is True
    assert disk["can_fast_zero"] is True and disk["can_df"] is True and disk["can_cache"] is True
    assert disk["is_rotational"] is False
    assert sorted(disk["contexts"]) == ["base:allocation", "qemu:allocation-depth"]
    assert [disk["block_size_minimum"], disk["block_size_preferred"],
            disk["block_size_maximum"]] == [1, 4096, 32 << 20]
    (ro,) = _json(["nbdinfo", "--json", served.uri("ro")])["exports"]
    assert ro["is_read_only"] is True and ro["description"] == "the same, read-only"
    assert ro["contexts"] == ["base:allocation"]


def test_nbdinfo_list(served) -> None:
    require("nbdinfo")
    listing = _json(["nbdinfo", "--list", "--json", served.uri("")])
    assert [(e["export-name"], e.get("description")) for e in listing["exports"]] == [
        ("disk", None), ("ro", "the same, read-only")]


def test_nbdinfo_map(served) -> None:
    require("nbdinfo")
    out = run(["nbdinfo", "--map", served.uri("disk")]).stdout.decode().split("\n")
    rows = [line.split() for line in out if line.strip()]
    assert rows[0][:3] == ["0", str(DATA_END), "0"]
    assert rows[1][:3] == [str(DATA_END), str(SIZE - DATA_END), "3"]
    depth = run(["nbdinfo", "--map=qemu:allocation-depth", served.uri("disk")]).stdout.split()
    assert depth[:3] == [b"0", str(SIZE).encode(), b"1"]


def test_tcp_and_qemu_img(served, tmp_path) -> None:
    require("qemu-img")
    info = _json(["qemu-img", "info", "--output=json", served.uri("disk")])
    assert info["virtual-size"] == SIZE
    tcp = f"nbd://127.0.0.1:{served.port}/ro"
    out = tmp_path / "copy.raw"
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", tcp, str(out)])
    assert out.read_bytes() == bytes(served.catalog.exports["ro"].data)
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", served.uri("disk"), str(out)])


def test_qemu_io_commands(served) -> None:
    require("qemu-io")
    script = ["write -P 0xab 0 64k", "read -P 0xab 0 64k", "write -z 64k 64k",
              "read -P 0 64k 64k", "discard 128k 64k", "read -P 0 128k 64k", "flush",
              "write -P 0xcd -f 3M 4k", "read -v 3M 16"]
    args = ["qemu-io", "-f", "raw"]
    for cmd in script:
        args += ["-c", cmd]
    proc = run(args + [served.uri("disk")])
    assert b"Pattern verification failed" not in proc.stdout
    data = served.catalog.exports["disk"].data
    assert data[:64 << 10] == b"\xab" * (64 << 10)
    assert data[64 << 10:192 << 10] == bytes(128 << 10)
    assert data[3 << 20:(3 << 20) + 4096] == b"\xcd" * 4096


def test_nbdcopy_out_and_in(served, tmp_path) -> None:
    require("nbdcopy")
    out = tmp_path / "out.raw"
    run(["nbdcopy", served.uri("ro"), str(out)])
    assert out.read_bytes() == bytes(served.catalog.exports["ro"].data)
    src = tmp_path / "in.raw"
    src.write_bytes(random.Random(2).randbytes(SIZE))
    run(["nbdcopy", "--connections=4", "--requests=16", str(src), served.uri("disk")])
    assert bytes(served.catalog.exports["disk"].data) == src.read_bytes()


def test_fio_nbd_engine(served) -> None:
    require("fio")
    proc = run(["fio", "--name=nbd", "--ioengine=nbd", f"--uri={served.uri('disk')}",
                "--rw=randrw", "--bs=4k", "--iodepth=16", "--size=8M", "--runtime=1",
                "--time_based", "--output-format=json"])
    job = json.loads(proc.stdout[proc.stdout.index(b"{"):])["jobs"][0]
    assert job["error"] == 0 and job["read"]["io_bytes"] > 0 and job["write"]["io_bytes"] > 0


def test_libnbd(tmp_path) -> None:
    if not os.path.exists("/usr/bin/python3") or subprocess.run(
            ["/usr/bin/python3", "-c", "import nbd"], capture_output=True, check=False).returncode:
        require("python3-libnbd (import nbd under /usr/bin/python3)")
    with ServedCatalog(make_catalog(SlowFirstBlock), unix=str(tmp_path / "s")) as served:
        result = json.loads(run(["/usr/bin/python3", str(LIBNBD_CLIENT),
                                 served.uri("disk")]).stdout)
        disk = served.catalog.exports["disk"]
    assert result["size"] == SIZE and result["structured"] and result["can_df"]
    assert result["can_fast_zero"] and result["can_cache"] and result["can_multi_conn"]
    assert result["contexts"] == ["base:allocation", "qemu:allocation-depth"]
    assert result["block_size"] == [1, 4096, 32 << 20]
    assert result["extents"]["base:allocation"] == [DATA_END, 0, SIZE - DATA_END, 3]
    assert result["extents"]["qemu:allocation-depth"] == [SIZE, 1]
    assert result["extents_req_one"]["base:allocation"] == [DATA_END, 0]
    assert result["sparse_chunks"] == [[0, 256 * 1024, "data"]]
    assert result["df_chunks"] == [[0, 256 * 1024]]
    assert result["after_fast_zero"] == 4096
    assert disk.calls.count("cache") == 1 and "trim" in disk.calls
    order = result["completion_order"]
    assert sorted(order) == list(range(16)), order
    assert order[0] != 0 and order.index(0) > 8, order  # the slow first read came late
    assert result["first_block"] == bytes(disk.data[:16]).hex()


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    require("certtool")
    return make_certs(tmp_path_factory.mktemp("certs"))


def test_tls_x509(certs, tmp_path) -> None:
    require("qemu-img")
    require("nbdinfo")
    with ServedCatalog(make_catalog(), tcp=True, tls=server_context(certs)) as served:
        port = served.port
        info = _json(["qemu-img", "info", "--output=json",
                      "--object", f"tls-creds-x509,id=tls0,dir={certs},endpoint=client",
                      "--image-opts",
                      f"driver=nbd,host=127.0.0.1,port={port},export=disk,tls-creds=tls0"])
        assert info["virtual-size"] == SIZE
        out = tmp_path / "tls.raw"
        run(["qemu-img", "convert", "--object",
             f"tls-creds-x509,id=tls0,dir={certs},endpoint=client", "--image-opts",
             f"driver=nbd,host=127.0.0.1,port={port},export=ro,tls-creds=tls0", "-O", "raw",
             str(out)])
        assert out.read_bytes() == bytes(served.catalog.exports["ro"].data)
        (disk,) = _json(["nbdinfo", "--json",
                         f"nbds://127.0.0.1:{port}/disk?tls-certificates={certs}"])["exports"]
        assert disk["export-size"] == SIZE
        plain = run(["nbdinfo", f"nbd://127.0.0.1:{port}/disk"], check=False)
        assert plain.returncode != 0  # NBD_REP_ERR_TLS_REQD, shown by libnbd as ENOTSUP


def test_tls_client_without_certificate_is_refused(certs, tmp_path) -> None:
    require("nbdinfo")
    bare = tmp_path / "ca-only"
    bare.mkdir()
    shutil.copy(certs / "ca-cert.pem", bare / "ca-cert.pem")
    with ServedCatalog(make_catalog(), tcp=True, tls=server_context(certs)) as served:
        proc = run(["nbdinfo", f"nbds://127.0.0.1:{served.port}/disk?tls-certificates={bare}"],
                   check=False)
        assert proc.returncode != 0
        # ... and the server still serves a proper client afterwards.
        run(["nbdinfo", f"nbds://127.0.0.1:{served.port}/disk?tls-certificates={certs}"])
