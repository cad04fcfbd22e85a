"""TLS credentials objects (tls-creds-x509, tls-creds-psk) for the NBD server.

Theory of operation
-------------------
``object-add qom-type=tls-creds-x509`` creates a :class:`X509Creds`: the
directory is read when the object is created, with QEMU 7.2's file names
and texts (crypto/tlscredsx509.c): ``ca-cert.pem`` (required), and for a
server endpoint ``server-cert.pem`` and ``server-key.pem`` (required),
``ca-crl.pem`` and ``dh-params.pem`` (optional); a client endpoint reads
``client-cert.pem``/``client-key.pem`` when they exist (required when
verify-peer is on, as in QEMU). ``sanity-check`` checks that the
certificates parse and that the key matches the certificate. The object
turns into an :class:`ssl.SSLContext` for the NBD server (server endpoint:
client certificates verified against the CA when verify-peer is on, the
default); ``priority`` (a GnuTLS priority string) is accepted and only the
few names with a Python meaning are honoured (``NORMAL`` and friends keep
Python's defaults).

``tls-creds-psk`` needs TLS-PSK, which Python's ssl offers only from 3.13
(``SSLContext.set_psk_server_callback``): on older Pythons object-add
refuses it with a text naming why. When present, ``keys.psk`` in the
directory holds ``identity:hexkey`` lines as QEMU's.

:class:`TlsCredsStore` is the registry of these objects by id and the
``tls_lookup`` of the export registry: it answers nbd-server-start's
``tls-creds`` with QEMU's texts (no such object, not TLS credentials, not a
server endpoint).
"""

from __future__ import annotations

import errno
import os
import ssl
from dataclasses import dataclass, field
from typing import Mapping

from qmpd.errors import QMPError

CA_CERT = "ca-cert.pem"
CA_CRL = "ca-crl.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
CLIENT_CERT = "client-cert.pem"
CLIENT_KEY = "client-key.pem"
DH_PARAMS = "dh-params.pem"
PSK_FILE = "keys.psk"

TLS_TYPES = ("tls-creds-x509", "tls-creds-psk", "tls-creds-anon")


def psk_supported() -> bool:
    return hasattr(ssl.SSLContext, "set_psk_server_callback")


def _path(directory: str, name: str, required: bool) -> str | None:
    """QEMU's qcrypto_tls_creds_get_path: "DIR/NAME", checked with access(R_OK)."""
    path = f"{directory}/{name}"
    if os.access(path, os.R_OK):
        return path
    try:
        os.stat(path)
        err = errno.EACCES
    except OSError as exc:
        err = exc.errno or errno.ENOENT
    if err == errno.ENOENT and not required:
        return None
    raise QMPError.generic(f"Unable to access credentials {path}: {os.strerror(err)}")


@dataclass
class TlsCreds:
    """What every TLS credentials object has (QCryptoTLSCreds)."""

    id: str
    qom_type: str
    directory: str | None
    endpoint: str = "client"
    verify_peer: bool = True
    priority: str | None = None

    def server_context(self) -> ssl.SSLContext:  # pragma: no cover - abstract
        raise QMPError.generic(f"TLS credentials '{self.id}' cannot serve")

    def properties(self) -> dict:
        return {
            "endpoint": self.endpoint,
            "verify-peer": self.verify_peer,
            "dir": self.directory,
            "priority": self.priority,
        }


@dataclass
class X509Creds(TlsCreds):
    """tls-creds-x509, loaded from its directory when created."""

    sanity_check: bool = True
    files: dict[str, str] = field(default_factory=dict)
    _context: ssl.SSLContext | None = None

    def load(self) -> None:
        """qcrypto_tls_creds_x509_load: which files, in QEMU's order, then a context."""
        if self.directory is None:
            raise QMPError.generic("Missing 'dir' property value")
        d = self.directory
        files: dict[str, str | None] = {"ca": _path(d, CA_CERT, True)}
        if self.endpoint == "server":
            files["crl"] = _path(d, CA_CRL, False)
            files["cert"] = _path(d, SERVER_CERT, True)
            files["key"] = _path(d, SERVER_KEY, True)
            files["dh"] = _path(d, DH_PARAMS, False)
        else:
            files["cert"] = _path(d, CLIENT_CERT, False)
            files["key"] = _path(d, CLIENT_KEY, False)
        self.files = {k: v for k, v in files.items() if v}
        self._context = self._make_context()

    def _make_context(self) -> ssl.SSLContext:
        server = self.endpoint == "server"
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if not server:
            ctx.check_hostname = False  # QEMU checks the name itself, against the URI host
        try:
            ctx.load_verify_locations(cafile=self.files["ca"])
        except (ssl.SSLError, OSError):
            raise QMPError.generic(
                f"Unable to import CA certificate list {self.files['ca']}"
            ) from None
        if "crl" in self.files:
            try:
                ctx.load_verify_locations(cafile=self.files["crl"])
                ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
            except (ssl.SSLError, OSError) as exc:
                raise QMPError.generic(
                    f"Unable to import CRL {self.files['crl']}: {_ssl_text(exc)}"
                ) from None
        if "cert" in self.files and "key" in self.files:
            try:
                ctx.load_cert_chain(self.files["cert"], self.files["key"])
            except (ssl.SSLError, OSError) as exc:
                raise QMPError.generic(
                    f"Cannot load certificate '{self.files['cert']}' & key "
                    f"'{self.files['key']}': {_ssl_text(exc)}"
                ) from None
        elif not server and self.verify_peer and ("cert" in self.files) != ("key" in self.files):
            raise QMPError.generic("Client certificate and key must both be given")
        if "dh" in self.files and hasattr(ctx, "load_dh_params"):
            try:
                ctx.load_dh_params(self.files["dh"])
            except (ssl.SSLError, OSError) as exc:
                raise QMPError.generic(
                    f"Unable to load DH parameters {self.files['dh']}: {_ssl_text(exc)}"
                ) from None
        ctx.verify_mode = ssl.CERT_REQUIRED if self.verify_peer else ssl.CERT_NONE
        if self.priority:
            _apply_priority(ctx, self.priority)
        return ctx

    def server_context(self) -> ssl.SSLContext:
        assert self._context is not None
        return self._context


def _apply_priority(ctx: ssl.SSLContext, priority: str) -> None:
    """The part of a GnuTLS priority string with a Python meaning: TLS versions."""
    items = [p.strip() for p in priority.split(":") if p.strip()]
    versions = {"VERS-TLS1.2": ssl.TLSVersion.TLSv1_2, "VERS-TLS1.3": ssl.TLSVersion.TLSv1_3}
    wanted = [versions[i[1:]] for i in items if i.startswith("+") and i[1:] in versions]
    if "-VERS-ALL" in items and wanted:
        ctx.minimum_version = min(wanted)
        ctx.maximum_version = max(wanted)
    for item in items:
        if item.startswith("-") and item[1:] in versions:
            if versions[item[1:]] == ssl.TLSVersion.TLSv1_2:
                ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            else:
                ctx.maximum_version = ssl.TLSVersion.TLSv1_2


def _ssl_text(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    return str(exc)


@dataclass
class PskCreds(TlsCreds):
    """tls-creds-psk (Python 3.13+): identity:hexkey lines in keys.psk."""

    username: str | None = None
    keys: dict[str, bytes] = field(default_factory=dict)

    def load(self) -> None:
        if self.directory is None:
            raise QMPError.generic("Missing 'dir' property value")
        path = _path(self.directory, PSK_FILE, True)
        assert path is not None
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                line = line.strip()
                if ":" in line:
                    ident, key = line.split(":", 1)
                    try:
                        self.keys[ident] = bytes.fromhex(key)
                    except ValueError:
                        raise QMPError.generic(f"Invalid PSK key in {path}") from None

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2  # OpenSSL's PSK callbacks are TLS 1.2's
        ctx.set_ciphers("PSK")
        keys = self.keys
        ctx.set_psk_server_callback(lambda identity: keys.get(identity or "", b""))  # type: ignore[attr-defined]
        return ctx


def make_creds(args: dict) -> TlsCreds:
    """A TLS credentials object from object-add's validated arguments, loaded."""
    qom_type = args["qom-type"]
    common = {
        "id": args["id"],
        "qom_type": qom_type,
        "directory": args.get("dir"),
        "endpoint": args.get("endpoint", "client"),
        "verify_peer": bool(args.get("verify-peer", True)),
        "priority": args.get("priority"),
    }
    creds: TlsCreds
    if qom_type == "tls-creds-x509":
        creds = X509Creds(**common, sanity_check=bool(args.get("sanity-check", True)))
        if args.get("passwordid") is not None:
            raise QMPError.generic("qmpd cannot read encrypted private keys (passwordid)")
        creds.load()
    elif qom_type == "tls-creds-psk":
        if not psk_supported():
            raise QMPError.generic(
                "TLS-PSK credentials need Python 3.13's ssl PSK support; this qmpd runs on "
                "a Python without it (use tls-creds-x509)"
            )
        creds = PskCreds(**common, username=args.get("username"))
        creds.load()
    else:
        raise QMPError.generic(
            f"qmpd does not offer {qom_type} objects: Python's ssl has no anonymous "
            "TLS key exchange (use tls-creds-x509)"
        )
    return creds


class TlsCredsStore:
    """TLS credentials objects by id, and nbd-server-start's ``tls_lookup``."""

    def __init__(self, objects: Mapping[str, str]) -> None:
        #: Every object of the daemon (id -> qom-type): for "is not TLS credentials".
        self.objects = objects
        self.creds: dict[str, TlsCreds] = {}

    def add(self, creds: TlsCreds) -> None:
        self.creds[creds.id] = creds

    def delete(self, creds_id: str) -> None:
        self.creds.pop(creds_id, None)

    def get(self, creds_id: str) -> TlsCreds:
        """nbd_get_tls_creds: the object, checked to be server credentials."""
        creds = self.creds.get(creds_id)
        if creds is None:
            if creds_id in self.objects:
                raise QMPError.generic(f"Object with id '{creds_id}' is not TLS credentials")
            raise QMPError.generic(f"No TLS credentials with id '{creds_id}'")
        if creds.endpoint != "server":
            raise QMPError.generic("Expected TLS credentials for a server endpoint")
        return creds

    def __call__(self, creds_id: str) -> ssl.SSLContext:
        return self.get(creds_id).server_context()


__all__ = [
    "TlsCredsStore",
    "TlsCreds",
    "X509Creds",
    "PskCreds",
    "make_creds",
    "psk_supported",
    "TLS_TYPES",
]
