"""The client side of the NBD wire, for tests: byte builders and a raw client.

Tests speak raw bytes to the server so that they can say exactly what a
(possibly hostile) client sends; the real clients are tested elsewhere.
"""

from __future__ import annotations

import socket
import struct
import time

from qmpd.nbd.constants import IHAVEOPT, REQUEST_MAGIC

GREETING_LEN = 18


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, opt, len(data)) + data


def name_field(name: bytes) -> bytes:
    return struct.pack(">I", len(name)) + name


def info_payload(name: bytes, requests: tuple[int, ...] = ()) -> bytes:
    """NBD_OPT_INFO / NBD_OPT_GO: name, then info requests."""
    return name_field(name) + struct.pack(f">H{len(requests)}H", len(requests), *requests)


def meta_payload(name: bytes, queries: list[bytes]) -> bytes:
    """NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT."""
    return (name_field(name) + struct.pack(">I", len(queries))
            + b"".join(name_field(q) for q in queries))


def request(cmd: int, offset: int = 0, length: int = 0, flags: int = 0, cookie: int = 1,
            payload: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length) + payload


def client_flags(flags: int) -> bytes:
    return struct.pack(">I", flags)


class RawClient:
    """A blocking socket that sends bytes and collects whatever comes back."""

    def __init__(self, address: str | tuple[str, int]) -> None:
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.connect(address)
        self.closed = False

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            self.closed = True

    def recv_quiet(self, quiet: float = 0.25, limit: float = 10.0) -> bytes:
        """Everything that arrives until the line is quiet for ``quiet`` s (or closes)."""
        out = bytearray()
        deadline = time.monotonic() + limit
        self.sock.settimeout(quiet)
        while time.monotonic() < deadline:
            try:
                chunk = self.sock.recv(1 << 20)
            except TimeoutError:
                break
            except ConnectionResetError:
                self.closed = True
                break
            if not chunk:
                self.closed = True
                break
            out += chunk
        return bytes(out)

    def recv_exactly(self, n: int, timeout: float = 10.0) -> bytes:
        out = bytearray()
        self.sock.settimeout(timeout)
        while len(out) < n:
            try:
                chunk = self.sock.recv(n - len(out))
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                self.closed = True
                break
            out += chunk
        return bytes(out)

    def close(self) -> None:
        self.sock.close()
