"""The smallest NBD client that works: fixed newstyle, NBD_OPT_GO, simple replies.

Enough for the Quick start to read and write an export without any tool
installed; real users have qemu-img, qemu-io, nbdcopy, nbdinfo or libnbd.
Protocol: https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md
"""

from __future__ import annotations

import socket
import struct

OPT_MAGIC = 0x49484156454F5054  # "IHAVEOPT"
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
OPT_GO, REP_ACK, REP_INFO, INFO_EXPORT = 7, 1, 3, 0
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH = 0, 1, 2, 3
FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2


class NbdClient:
    def __init__(self, socket_path: str, export: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(socket_path)
        self._handle = 0
        magic, opt, _flags = struct.unpack(">QQH", self._recv(18))
        if magic != 0x4E42444D41474943 or opt != OPT_MAGIC:
            raise ConnectionError("not a fixed newstyle NBD server")
        self.sock.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        name = export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self.sock.sendall(struct.pack(">QII", OPT_MAGIC, OPT_GO, len(data)) + data)
        self.size = 0
        while True:
            magic, _opt, kind, length = struct.unpack(">QIII", self._recv(20))
            payload = self._recv(length)
            if kind & 0x80000000:
                raise ConnectionError(f"export refused: {payload[4:].decode(errors='replace')}")
            if kind == REP_INFO and struct.unpack(">H", payload[:2])[0] == INFO_EXPORT:
                self.size = struct.unpack(">Q", payload[2:10])[0]
            if kind == REP_ACK:
                return

    def _recv(self, n: int) -> bytes:
        chunks = []
        while n:
            chunk = self.sock.recv(n)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def _request(self, cmd: int, offset: int = 0, length: int = 0, data: bytes = b"") -> bytes:
        self._handle += 1
        self.sock.sendall(
            struct.pack(">IHHQQI", REQUEST_MAGIC, 0, cmd, self._handle, offset, length) + data
        )
        if cmd == CMD_DISC:
            return b""
        magic, error, handle = struct.unpack(">IIQ", self._recv(16))
        if magic != SIMPLE_REPLY_MAGIC or handle != self._handle:
            raise ConnectionError("unexpected reply")
        if error:
            raise OSError(error, "NBD request failed")
        return self._recv(length) if cmd == CMD_READ else b""

    def read(self, offset: int, length: int) -> bytes:
        return self._request(CMD_READ, offset, length)

    def write(self, offset: int, data: bytes) -> None:
        self._request(CMD_WRITE, offset, len(data), data)

    def flush(self) -> None:
        self._request(CMD_FLUSH)

    def close(self) -> None:
        self._request(CMD_DISC)
        self.sock.close()
