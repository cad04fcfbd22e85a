"""TLS exports: tls-creds-x509 made by object-add/--object, real TLS clients.

Certificates are made by the test (certtool, tests/nbd/certs.py). qemu-img,
qemu-io and nbdinfo connect with x509 client certificates; a plain client
and a client without a certificate (verify-peer on) are refused, with the
same client-side texts as when qsd serves.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from tests.integration.exports_helpers import (Qmp, plain_image, qemu_io, rmtree, short_tmp,
                                               wait_for_socket)
from tests.nbd.certs import make_certs
from tests.oracles import require, run, run_qemu_img
from tests.processes import stop

pytestmark = pytest.mark.interop

MiB = 1 << 20


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="module")
def certs():
    require("certtool")
    d = short_tmp("qxc-")
    make_certs(Path(d) / "pki")
    # a client directory with the CA only: no client certificate to offer
    Path(d, "ca-only").mkdir()
    Path(d, "ca-only", "ca-cert.pem").write_bytes(Path(d, "pki", "ca-cert.pem").read_bytes())
    yield d
    rmtree(d)


def wait_port(port: int, timeout: float = 10.0) -> None:
    import time
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def daemon_args(wd: str, pki: str, port: int, verify_peer: bool = True) -> list[str]:
    img = plain_image(os.path.join(wd, "a.img"), "raw", "8M")
    return ["--object", f"tls-creds-x509,id=tls0,endpoint=server,dir={pki},"
                        f"verify-peer={'on' if verify_peer else 'off'}",
            "--blockdev", f"driver=file,node-name=f0,filename={img}",
            "--nbd-server", f"addr.type=inet,addr.host=127.0.0.1,addr.port={port},"
                            "tls-creds=tls0",
            "--export", "type=nbd,id=e0,node-name=f0,name=disk,writable=on"]


def tls_client(port: int, client_dir: str) -> list[str]:
    return ["--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={client_dir}",
            "--image-opts", f"driver=nbd,host=127.0.0.1,port={port},export=disk,tls-creds=tls0"]


def test_tls_clients(qmpd_daemon, certs) -> None:
    require("nbdinfo")
    wd = short_tmp()
    try:
        port = free_port()
        pki = os.path.join(certs, "pki")
        _sock, _proc = qmpd_daemon(*daemon_args(wd, pki, port), workdir=wd)
        wait_port(port)
        info = json.loads(run_qemu_img(["info", "--output=json",
                                        *tls_client(port, pki)]).stdout)
        assert info["virtual-size"] == 8 * MiB
        qemu_io(tls_client(port, pki), "write -P 0x42 0 1M", "read -P 0x42 0 1M", "flush")
        out = json.loads(run(["nbdinfo", "--json",
                              f"nbds://127.0.0.1:{port}/disk?tls-certificates={pki}"]).stdout)
        assert out["TLS"] is True and out["exports"][0]["export-size"] == 8 * MiB
        mapped = run(["nbdinfo", "--map", f"nbds://127.0.0.1:{port}/disk?tls-certificates={pki}"])
        assert b"data" in mapped.stdout
    finally:
        rmtree(wd)


def refusals(port: int, certs: str) -> dict:
    """What clients that cannot or will not do TLS are told."""
    plain = run(["qemu-img", "info", f"nbd://127.0.0.1:{port}/disk"], check=False)
    no_cert = run(["qemu-img", "info", *tls_client(port, os.path.join(certs, "ca-only"))],
                  check=False)
    nbdinfo = run(["nbdinfo", "--size", f"nbd://127.0.0.1:{port}/disk"], check=False)
    return {"plain": (plain.returncode, plain.stderr.decode().replace(str(port), "PORT")),
            "no client certificate": (no_cert.returncode != 0,),
            "nbdinfo plain": nbdinfo.returncode != 0}


def test_tls_required_server_refuses_plain_clients_as_qsd(qmpd_daemon, certs) -> None:
    require("qemu-storage-daemon")
    require("nbdinfo")
    from tests.tools.qsd_transcript import start_qsd
    results = []
    for daemon in ("qsd", "qmpd"):
        wd = short_tmp()
        try:
            port = free_port()
            args = daemon_args(wd, os.path.join(certs, "pki"), port)
            if daemon == "qsd":
                proc = start_qsd(os.path.join(wd, "qsd.sock"), args, wd)
            else:
                _sock, proc = qmpd_daemon(*args, workdir=wd)
            try:
                wait_port(port)
                results.append(refusals(port, certs))
            finally:
                stop(proc)
        finally:
            rmtree(wd)
    qsd, ours = results
    assert qsd["plain"][0] != 0 and qsd["no client certificate"] == (True,)
    assert ours == qsd


def test_tls_over_qmp_and_without_peer_verification(qmpd_daemon, certs) -> None:
    wd = short_tmp()
    try:
        img = plain_image(os.path.join(wd, "a.img"), "raw", "8M")
        sock, _proc = qmpd_daemon("--blockdev", f"driver=file,node-name=f0,filename={img}",
                                  workdir=wd)
        qmp = Qmp(sock)
        qmp.ok("object-add", {"qom-type": "tls-creds-x509", "id": "t0", "endpoint": "server",
                              "dir": os.path.join(certs, "pki"), "verify-peer": False})
        port = free_port()
        qmp.ok("nbd-server-start", {"addr": {"type": "inet", "data": {
            "host": "127.0.0.1", "port": str(port)}}, "tls-creds": "t0"})
        qmp.ok("block-export-add", {"type": "nbd", "id": "e0", "node-name": "f0",
                                    "name": "disk"})
        # verify-peer off: a client with only the CA (no certificate of its own) gets in
        info = json.loads(run_qemu_img(["info", "--output=json", *tls_client(
            port, os.path.join(certs, "ca-only"))]).stdout)
        assert info["virtual-size"] == 8 * MiB
        plain = run(["qemu-img", "info", f"nbd://127.0.0.1:{port}/disk"], check=False)
        assert plain.returncode != 0
        qmp.ok("nbd-server-stop")
        qmp.close()
    finally:
        rmtree(wd)


def test_tls_over_unix_socket(qmpd_daemon, certs) -> None:
    wd = short_tmp()
    try:
        img = plain_image(os.path.join(wd, "a.img"), "raw", "8M")
        nbd_sock = os.path.join(wd, "nbd.sock")
        pki = os.path.join(certs, "pki")
        qmpd_daemon("--object", f"tls-creds-x509,id=tls0,endpoint=server,dir={pki}",
                    "--blockdev", f"driver=file,node-name=f0,filename={img}",
                    "--nbd-server", f"addr.type=unix,addr.path={nbd_sock},tls-creds=tls0",
                    "--export", "type=nbd,id=e0,node-name=f0,name=disk", workdir=wd)
        wait_for_socket(nbd_sock)
        info = json.loads(run_qemu_img([
            "info", "--output=json", "--object",
            f"tls-creds-x509,id=tls0,endpoint=client,dir={pki}", "--image-opts",
            f"driver=nbd,server.type=unix,server.path={nbd_sock},export=disk,tls-creds=tls0,"
            "tls-hostname=localhost"]).stdout)
        assert info["virtual-size"] == 8 * MiB
    finally:
        rmtree(wd)
