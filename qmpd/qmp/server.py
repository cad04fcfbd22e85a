"""The QMP server on a listening socket: one connection, its session and its tasks.

Every client gets a :class:`Connection` with three tasks in its own nursery:

- the *reader* feeds bytes to the session; out-of-band requests are run at
  once, in-band items go into a small queue. When the queue is full the
  reader stops reading (QEMU suspends the monitor the same way), so a
  client that floods us is throttled by TCP-style backpressure, not buffered.
- the *dispatcher* runs in-band requests one after another, so replies keep
  the order of the requests.
- the *writer* drains the outgoing buffer. A client that does not read its
  replies or events is disconnected once more than ``max_queued_bytes``
  wait for it; it never slows down anyone else.
"""

from __future__ import annotations

import errno
import logging
import os
import socket as stdlib_socket
import stat
import time
from typing import Any, Protocol

import trio

from qmpd.errors import QMPError
from qmpd.qmp.pretty import encode_pretty
from qmpd.qmp.session import Call, Incoming, Session
from qmpd.qmp.wire import encode_message


class SessionHost(Protocol):
    """What a connection needs of the daemon that accepted it (the daemon is
    the only implementation; the wire never imports it)."""

    schema: Any
    limits: Any
    connections: set

    def greeting(self) -> dict: ...

    async def execute(self, call: Call, session: Session, connection: Any) -> dict: ...


log = logging.getLogger("qmpd.server")

#: In-band requests queued per session before the reader stops reading
#: (QEMU's QMP_REQ_QUEUE_LEN_MAX is 8 with OOB and 1 without).
QUEUE_LENGTH = 8


class ServerError(Exception):
    """The server could not start; str() is the message for the user."""


def prepare_socket_path(path: str) -> None:
    """Replace a stale socket file; refuse anything else that is in the way."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ServerError(
            f"Could not listen on '{path}': a file that is not a socket is in the way"
        )
    probe = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: a leftover of a dead process
        return
    finally:
        probe.close()
    raise ServerError(f"Could not listen on '{path}': another process is listening on it")


def open_unix_listener(path: str, backlog: int = 128) -> trio.SocketListener:
    """Bind with umask 0177 so the socket is 0600 from its first instant."""
    prepare_socket_path(path)
    sock = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)  # a local bind never blocks
    except OSError as exc:
        sock.close()
        raise ServerError(
            f"Could not listen on '{path}': {os.strerror(exc.errno or errno.EIO)}"
        ) from None
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(backlog)
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


class Connection:
    """One client: a QMP session plus the tasks that feed and drain it."""

    def __init__(
        self, daemon: SessionHost, stream: trio.abc.Stream, number: int, *, pretty: bool = False
    ) -> None:
        self.daemon = daemon
        self.stream = stream
        self.number = number
        #: ``pretty=on`` monitors write QEMU's indented layout.
        self.encode = encode_pretty if pretty else encode_message
        self.session = Session(daemon.schema)
        self._inband_send, self._inband_recv = trio.open_memory_channel[Incoming](QUEUE_LENGTH - 1)
        self._out = bytearray()
        self._out_ready = trio.Event()
        self._closed = False
        self._finishing = False
        self._cancel_scope: trio.CancelScope | None = None

    # -- output --------------------------------------------------------------
    def send_message(self, message: dict) -> None:
        """Queue a reply or event; never blocks. Cuts loose a client that doesn't read."""
        if self._closed:
            return
        self._out += self.encode(message)
        if len(self._out) > self.daemon.limits.max_queued_bytes:
            log.warning("session %d: client does not read its replies; disconnecting", self.number)
            self.close()
            return
        self._out_ready.set()

    def has_pending_output(self) -> bool:
        return bool(self._out) and not self._closed

    def send_event(self, message: dict) -> None:
        if self.session.negotiated:
            self.send_message(message)

    def close(self) -> None:
        self._closed = True
        self._out_ready.set()
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()

    async def _writer(self) -> None:
        """Send what is queued; return once closing and nothing is left."""
        while True:
            await self._out_ready.wait()
            self._out_ready = trio.Event()
            while self._out and not self._closed:
                chunk = bytes(self._out)
                self._out.clear()
                await self.stream.send_all(chunk)
            if self._closed or self._finishing:
                return

    # -- input ---------------------------------------------------------------
    async def _reader(self) -> None:
        try:
            while True:
                data = await self.stream.receive_some(65536)
                if not data:
                    break
                for item in self.session.receive(data):
                    if item.oob:
                        await self._run(item)
                    else:
                        await self._inband_send.send(item)
                if self.session.pending_bytes() > self.daemon.limits.max_message_bytes:
                    self.send_message(
                        Session.error_reply(QMPError.generic("JSON token size limit exceeded"))
                    )
                    break
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._inband_send.close()

    async def _dispatcher(self) -> None:
        async with self._inband_recv:
            async for item in self._inband_recv:
                await self._run(item)

    async def _run(self, item: Incoming) -> None:
        outcome = self.session.dispatch(item)
        if not isinstance(outcome, Call):
            self.send_message(outcome)
            return
        self.send_message(await self.daemon.execute(outcome, self.session, self))

    async def run(self) -> None:
        self.daemon.connections.add(self)
        try:
            with trio.CancelScope() as scope:
                self._cancel_scope = scope
                self.send_message(self.daemon.greeting())
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer)
                    async with trio.open_nursery() as inbound:
                        inbound.start_soon(self._dispatcher)
                        inbound.start_soon(self._reader)
                    # The client closed its side: deliver the last replies.
                    self._finishing = True
                    self._out_ready.set()
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away: nothing left to tell it
        finally:
            self.daemon.connections.discard(self)
            self._closed = True
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self.stream)


def event_message(name: str, data: Any | None) -> dict:
    now = time.time()
    seconds = int(now)
    message: dict = {
        "timestamp": {"seconds": seconds, "microseconds": int((now - seconds) * 1e6)},
        "event": name,
    }
    if data is not None:
        message["data"] = data
    return message
