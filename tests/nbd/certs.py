"""A throw-away x509 CA with a server and a client certificate (certtool).

The file names are the ones QEMU's tls-creds-x509 and libnbd's
tls-certificates directories expect: ca-cert.pem, server-cert.pem,
server-key.pem, client-cert.pem, client-key.pem.
"""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

_TEMPLATES = {
    "ca": "cn = qmpd test CA\nca\ncert_signing_key\nexpiration_days = 2\n",
    "server": ("organization = qmpd\ncn = localhost\ndns_name = localhost\n"
               "ip_address = 127.0.0.1\ntls_www_server\nencryption_key\nsigning_key\n"
               "expiration_days = 2\n"),
    "client": ("organization = qmpd\ncn = qmpd-client\ntls_www_client\nencryption_key\n"
               "signing_key\nexpiration_days = 2\n"),
}


def _certtool(*args: str) -> None:
    subprocess.run(["certtool", *args], check=True, capture_output=True)


def make_certs(directory: Path) -> Path:
    """Write a CA, server and client key pairs into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    for role, template in _TEMPLATES.items():
        (directory / f"{role}.info").write_text(template)
        _certtool("--generate-privkey", "--key-type=ecdsa", "--outfile", str(directory / f"{role}-key.pem"))
    _certtool("--generate-self-signed", "--load-privkey", str(directory / "ca-key.pem"),
              "--template", str(directory / "ca.info"), "--outfile", str(directory / "ca-cert.pem"))
    for role in ("server", "client"):
        _certtool("--generate-certificate", "--load-privkey", str(directory / f"{role}-key.pem"),
                  "--load-ca-certificate", str(directory / "ca-cert.pem"),
                  "--load-ca-privkey", str(directory / "ca-key.pem"),
                  "--template", str(directory / f"{role}.info"),
                  "--outfile", str(directory / f"{role}-cert.pem"))
    return directory


def server_context(directory: Path, *, verify_peer: bool = True) -> ssl.SSLContext:
    """What QEMU's tls-creds-x509 endpoint=server,verify-peer=on does."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(directory / "server-cert.pem", directory / "server-key.pem")
    if verify_peer:
        ctx.load_verify_locations(directory / "ca-cert.pem")
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(directory: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(directory / "ca-cert.pem"))
    ctx.load_cert_chain(directory / "client-cert.pem", directory / "client-key.pem")
    return ctx
