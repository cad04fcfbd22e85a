"""Byte transports under one NBD connection: a plain socket, or a TLS stream.

Why not trio's SocketStream throughout: every successful send_all and
receive_some on it passes through the scheduler (a checkpoint before, a
yield after), which at one send and one receive per 4 KiB request cost
more than the whole NBD protocol. :class:`SocketTransport` tries the
non-blocking call first and waits only when the kernel says EAGAIN.
That removes the implicit checkpoints, so the connection adds its own
where a busy peer could otherwise monopolise the loop (see
qmpd.nbd.server).

The plain transport works on a duplicate of the socket's file descriptor
(trio keeps its socket object private); it closes the duplicate first
and the trio stream after.
"""

from __future__ import annotations

import os
import socket

import trio

_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)
_IOV_BATCH = 512  # below IOV_MAX (1024 on Linux)


class StreamTransport:
    """Any trio stream (trio.SSLStream after STARTTLS): no fast path."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream

    def try_send(self, data) -> int:
        return 0

    async def send_all(self, data) -> None:
        await self.stream.send_all(data)

    async def send_buffers(self, buffers: list) -> None:
        await self.stream.send_all(b"".join(buffers))

    def send_buffers_now(self, buffers: list) -> list:
        """Send what the kernel takes now, without yielding; the buffers left
        (the first one maybe cut). A TLS stream cannot: everything is left."""
        return buffers

    async def receive_some(self, max_bytes: int) -> bytes | bytearray:
        return await self.stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


class SocketTransport(StreamTransport):
    """A trio.SocketStream, sent to and read from without needless yields."""

    def __init__(self, stream: trio.SocketStream) -> None:
        super().__init__(stream)
        self._trio_socket = stream.socket
        self._sock = socket.socket(fileno=os.dup(stream.socket.fileno()))
        self._sock.setblocking(False)

    def try_send(self, data) -> int:
        """Send what the kernel takes now (maybe nothing) without yielding."""
        try:
            return self._sock.send(data)
        except BlockingIOError:
            return 0
        except _GONE as e:
            raise trio.BrokenResourceError from e

    async def send_all(self, data) -> None:
        view = memoryview(data)
        while view:
            await trio.lowlevel.wait_writable(self._trio_socket)
            view = view[self.try_send(view) :]

    async def send_buffers(self, buffers: list) -> None:
        """Gather-send (sendmsg): many replies, one system call, no joins."""
        while buffers := self.send_buffers_now(buffers):
            await trio.lowlevel.wait_writable(self._trio_socket)

    def send_buffers_now(self, buffers: list) -> list:
        first = 0
        while first < len(buffers):
            batch = buffers[first : first + _IOV_BATCH]
            try:
                sent = self._sock.sendmsg(batch)
            except BlockingIOError:
                sent = 0
            except _GONE as e:
                raise trio.BrokenResourceError from e
            for buf in batch:
                size = len(buf)
                if sent < size:
                    buffers[first] = memoryview(buf)[sent:]
                    return buffers[first:]
                sent -= size
                first += 1
        return []

    async def receive_some(self, max_bytes: int) -> bytes:
        while True:
            try:
                return self._sock.recv(max_bytes)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self._trio_socket)
            except _GONE as e:
                raise trio.BrokenResourceError from e

    async def aclose(self) -> None:
        self._sock.close()
        await super().aclose()
