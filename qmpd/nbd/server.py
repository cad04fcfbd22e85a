"""The NBD server's edge: trio sockets, TLS, concurrency, client accounting.

Theory of operation
-------------------
:class:`NbdServer` accepts on any number of listeners (a unix path, TCP,
or an inherited listening fd) while fewer than ``max_connections`` clients
are connected; when full it stops accepting, as QEMU does, so further
clients wait in the kernel's backlog rather than being refused. Each client
runs in its own task (:class:`_Client`) under the server's nursery; nothing
a client does can end the server: protocol violations end that connection
(logged with QEMU's reason), unexpected exceptions are logged by type only
(a message might carry data) and end that connection too.

A client's reader task feeds the sans-IO :class:`NbdConnection`. The READs
one receive brings are first offered to the export at once
(:func:`reads_now`: one ``read_now()`` call for the burst, which a LUKS
node decrypts in one pass); those it can answer without waiting (page
cache, free locks) are answered by the reader itself, which also sends the
queued replies before it reads again. Everything else is queued
for a pool of at most 16 worker tasks (QEMU's
MAX_NBD_REQUESTS), spawned on demand; each worker runs one backend call at
a time, so up to 16 run concurrently and replies leave in completion order,
not request order. Replies are queued for the connection's writer task,
which sends each batch with one gather-send: whole replies, never
interleaved, and one system call for a burst (see _Client for the
bookkeeping). At most 16 requests are taken and not yet answered on the
wire; the reader stops reading while that many are queued or in flight, so
a client that stops reading only stalls its own connection, with at most 16
replies held for it.

The handshake, TLS included, must finish within ``handshake_timeout``
seconds (QEMU 7.2 in Debian with the CVE-2024-7409 fix: 10 s), after which
the connection is dropped.

Clients are counted per export once negotiated: :meth:`NbdServer.clients`
answers block-export-del mode=safe, :meth:`NbdServer.close_clients` is the
hard mode and nbd-server-stop, and ``on_export_unused`` is called when the
last client of an export is gone (a deleted export can then be released).
"""

from __future__ import annotations

import errno
import logging
import math
import os
import socket as stdlib_socket
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

import trio

from qmpd.nbd.backend import ExportList, ExportLookup, NbdExport
from qmpd.nbd.constants import MAX_REQUESTS_IN_FLIGHT, Cmd, CmdFlag
from qmpd.nbd.events import Disconnect, Negotiated, Request, StartTls
from qmpd.nbd.protocol import NbdConnection
from qmpd.nbd.transmission import strerror
from qmpd.nbd.transport import SocketTransport, StreamTransport

log = logging.getLogger(__name__)

#: Bytes asked of the socket per receive: a 1 MiB WRITE arrives in a few.
RECEIVE_SIZE = 256 * 1024
DEFAULT_MAX_CONNECTIONS = 100
DEFAULT_HANDSHAKE_TIMEOUT = 10.0

_STREAM_GONE = (trio.BrokenResourceError, trio.ClosedResourceError)


# -- running one request against the export -----------------------------------

Reply = bytes | list


async def _read(conn: NbdConnection, export: NbdExport, req: Request) -> Reply:
    """QEMU's nbd_do_cmd_read() and nbd_co_send_sparse_read()."""
    if req.flags & CmdFlag.FUA:  # QEMU flushes first; the spec only documents FUA for writes
        try:
            await export.flush()
        except OSError as e:
            return conn.reply_error(req, e.errno, "flush failed")
    if not req.sparse:
        try:
            data = await export.read(req.offset, req.length) if req.length else b""
        except OSError as e:
            return conn.reply_error(req, e.errno, "reading from file failed")
        return conn.reply_read(req, [(req.length, data)] if req.length else [])
    segments: list = []
    offset, end = req.offset, req.offset + req.length
    while offset < end:
        try:
            runs = _zero_runs(await export.block_status(offset, end - offset), end - offset)
        except OSError as e:
            # QEMU has sent the chunks before this one already; the error ends the reply.
            return conn.reply_read(req, segments, done=False) + [
                conn.reply_error(req, e.errno, f"unable to check for holes: {strerror(e.errno)}")
            ]
        for length, zero in runs:
            if zero:
                segments.append((length, None))
            else:
                try:
                    segments.append((length, await export.read(offset, length)))
                except OSError:
                    # QEMU 7.2 hangs up here after the chunks it has sent.
                    return _Partial(conn.reply_read(req, segments, done=False))
            offset += length
    return conn.reply_read(req, segments)


def reads_now(
    conn: NbdConnection, export: NbdExport, reqs: Sequence[Request]
) -> list[Reply | None]:
    """_read() of a burst of READs at once, where the export can answer
    without waiting (page-cached data, free locks): the replies, None for
    each request left to a worker. One read_now() call for the whole burst
    lets the export decrypt it in one pass. Any error sends the request to
    a worker, which runs it again and reports the error as QEMU does."""
    plans: list[list[tuple[int, int, bool]] | None] = []
    ranges: list[tuple[int, int]] = []
    for req in reqs:
        plan = _read_plan(export, req)
        plans.append(plan)
        if plan:
            ranges.extend((offset, length) for offset, length, zero in plan if not zero)
    data: Sequence | None = []
    if ranges:
        try:
            data = export.read_now(ranges)
        except OSError:
            data = None
        if data is None and len(reqs) > 1:  # one uncached read must not hold back the others
            return [reads_now(conn, export, [req])[0] for req in reqs]
    if data is None:
        return [None] * len(reqs)
    replies: list[Reply | None] = []
    pieces = iter(data)
    for req, plan in zip(reqs, plans, strict=True):
        if plan is None:
            replies.append(None)
            continue
        segments = [(length, None if zero else next(pieces)) for _, length, zero in plan]
        replies.append(conn.reply_read(req, segments))
    return replies


def _read_plan(export: NbdExport, req: Request) -> list[tuple[int, int, bool]] | None:
    """(offset, length, reads as zeroes) runs of a READ from block status
    taken at once; None if that would wait (or failed)."""
    if not req.sparse:
        return [(req.offset, req.length, False)] if req.length else []
    plan = []
    offset, end = req.offset, req.offset + req.length
    try:
        while offset < end:
            extents = export.block_status_now(offset, end - offset)
            if extents is None:
                return None
            for length, zero in _zero_runs(extents, end - offset):
                plan.append((offset, length, zero))
                offset += length
    except OSError:
        return None
    return plan


class _Partial(list):
    """Reply bytes after which the connection must close."""


def _zero_runs(extents, limit: int) -> list[tuple[int, bool]]:
    """Merge extents into runs that read as zeroes or not (at most ``limit`` bytes)."""
    runs: list[list] = []
    for extent in extents:
        length = min(extent.length, limit)
        if length <= 0:
            break
        limit -= length
        zero = bool(extent.zero)
        if runs and runs[-1][1] == zero:
            runs[-1][0] += length
        else:
            runs.append([length, zero])
    if not runs:
        raise OSError(errno.EIO, "block status made no progress")
    return [(n, z) for n, z in runs]


async def _write(conn, export, req):
    try:
        await export.write(req.offset, req.payload, req.fua)
    except OSError as e:
        return conn.reply_error(req, e.errno, "writing to file failed")
    return conn.reply_ok(req)


async def _write_zeroes(conn, export, req):
    try:
        await export.write_zeroes(
            req.offset,
            req.length,
            may_unmap=not req.flags & CmdFlag.NO_HOLE,
            fua=req.fua,
            fast=bool(req.flags & CmdFlag.FAST_ZERO),
        )
    except OSError as e:
        return conn.reply_error(req, e.errno, "writing to file failed")
    return conn.reply_ok(req)


async def _flush(conn, export, req):
    try:
        await export.flush()
    except OSError as e:
        return conn.reply_error(req, e.errno, "flush failed")
    return conn.reply_ok(req)


async def _trim(conn, export, req):
    try:
        await export.trim(req.offset, req.length)
        if req.fua:
            await export.flush()
    except OSError as e:
        return conn.reply_error(req, e.errno, "discard failed")
    return conn.reply_ok(req)


async def _cache(conn, export, req):
    try:
        await export.cache(req.offset, req.length)
    except OSError as e:
        return conn.reply_error(req, e.errno, "caching data failed")
    return conn.reply_ok(req)


async def _block_status(conn, export, req):
    builder = conn.block_status_reply(req)
    try:
        while not builder.done:
            before = builder.next_offset
            builder.feed(await export.block_status(before, builder.end - before))
            if builder.next_offset == before:
                raise OSError(errno.EIO, "block status made no progress")
    except OSError as e:
        return conn.reply_error(req, e.errno, "can't get block status")
    return builder.reply()


#: What each command does (the protocol only lets known commands through).
COMMANDS: dict[int, Callable[[NbdConnection, NbdExport, Request], Awaitable[Reply]]] = {
    Cmd.READ: _read,
    Cmd.WRITE: _write,
    Cmd.WRITE_ZEROES: _write_zeroes,
    Cmd.FLUSH: _flush,
    Cmd.TRIM: _trim,
    Cmd.CACHE: _cache,
    Cmd.BLOCK_STATUS: _block_status,
}


async def execute(conn: NbdConnection, export: NbdExport, req: Request) -> Reply:
    """Run one request; the reply as bytes or a list of buffers (a
    :class:`_Partial` list means: send it, then hang up)."""
    return await COMMANDS[req.command](conn, export, req)


# -- listeners --------------------------------------------------------------------


def unix_listener(path: str, backlog: int = 128) -> trio.SocketListener:
    """Listen on a unix socket path (a stale socket file is replaced, as QEMU does)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    try:
        # Synchronous: a local path, no DNS. _sock, the stdlib socket trio wraps,
        # is private to trio and not in its types.
        sock._sock.bind(path)  # type: ignore[attr-defined]
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


async def tcp_listeners(host: str | None, port: int) -> list[trio.SocketListener]:
    return await trio.open_tcp_listeners(port, host=host)


def fd_listener(fd: int) -> trio.SocketListener:
    """A listening socket inherited as a file descriptor (socket activation, fd passing)."""
    return trio.SocketListener(trio.socket.from_stdlib_socket(stdlib_socket.socket(fileno=fd)))


# -- the server ---------------------------------------------------------------------


class NbdServer:
    """Serves the exports that ``lookup``/``list_exports`` know to NBD clients."""

    def __init__(
        self,
        lookup: ExportLookup,
        list_exports: ExportList,
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        tls: ssl.SSLContext | None = None,
        tls_required: bool | None = None,
        on_export_unused: Callable[[NbdExport], None] | None = None,
    ) -> None:
        self.lookup = lookup
        self.list_exports = list_exports
        self.max_connections = max_connections  # 0: unlimited, as QEMU
        self.handshake_timeout = handshake_timeout
        self.tls = tls
        # QEMU knows only "TLS required"; optional TLS is ours, for tests and migrations.
        self.tls_required = tls is not None if tls_required is None else tls_required
        self.on_export_unused = on_export_unused
        self._connections = 0
        self._room = trio.Event()
        self._by_export: dict[int, tuple[NbdExport, set[_Client]]] = {}
        self._all: set[_Client] = set()
        self._scope: trio.CancelScope | None = None

    # -- what the QMP layer asks ---------------------------------------------
    def clients(self, export: NbdExport) -> int:
        """How many negotiated clients use ``export``."""
        entry = self._by_export.get(id(export))
        return len(entry[1]) if entry else 0

    def close_clients(self, export: NbdExport | None = None) -> None:
        """Hang up on every client of ``export`` (None: every client, handshakes too)."""
        if export is None:
            targets = list(self._all)
        else:
            targets = list(self._by_export.get(id(export), (None, ()))[1])
        for client in targets:
            client.scope.cancel()

    @property
    def connections(self) -> int:
        return self._connections

    def stop(self) -> None:
        """nbd-server-stop: stop listening and hang up on everyone."""
        if self._scope is not None:
            self._scope.cancel()

    # -- serving ------------------------------------------------------------------
    async def serve(
        self, listeners: Sequence[trio.SocketListener], *, task_status=trio.TASK_STATUS_IGNORED
    ) -> None:
        """Accept and serve until cancelled or :meth:`stop`; closes the listeners."""
        with trio.CancelScope() as self._scope:
            try:
                async with trio.open_nursery() as nursery:
                    for listener in listeners:
                        nursery.start_soon(self._accept_loop, listener, nursery)
                    task_status.started()
            finally:
                for listener in listeners:
                    with trio.CancelScope(shield=True):
                        await listener.aclose()

    def _full(self) -> bool:
        return bool(self.max_connections) and self._connections >= self.max_connections

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            while self._full():
                await self._room.wait()
            try:
                stream = await listener.accept()
            except OSError as e:  # EMFILE and friends: back off, keep serving
                log.warning(
                    "NBD accept failed: %s",
                    None if e.errno is None else errno.errorcode.get(e.errno, e.errno),
                )
                await trio.sleep(0.1)
                continue
            self._connections += 1
            nursery.start_soon(self._run_client, stream)

    async def _run_client(self, stream: trio.abc.Stream) -> None:
        client = _Client(self, stream)
        self._all.add(client)
        try:
            await client.run()
        except Exception as e:  # noqa: BLE001 - a client never takes the server down
            log.warning("NBD client closed after an internal error (%s)", _type_names(e))
        finally:
            self._all.discard(client)
            self._detach(client)
            await client.transport.aclose()
            self._connections -= 1
            self._room.set()
            self._room = trio.Event()

    def _attach(self, client: _Client, export: NbdExport) -> None:
        self._by_export.setdefault(id(export), (export, set()))[1].add(client)

    def _detach(self, client: _Client) -> None:
        export = client.export
        if export is None:
            return
        entry = self._by_export.get(id(export))
        if entry is None:
            return
        entry[1].discard(client)
        if not entry[1]:
            del self._by_export[id(export)]
            if self.on_export_unused is not None:
                try:
                    self.on_export_unused(export)
                except Exception as e:  # noqa: BLE001
                    log.warning("NBD on_export_unused failed (%s)", type(e).__name__)


def _type_names(exc: BaseException) -> str:
    """Only the types: an exception's message may carry guest data or secrets."""
    if isinstance(exc, BaseExceptionGroup):
        return ", ".join(sorted({_type_names(e) for e in exc.exceptions}))
    return type(exc).__name__


class _Client:
    """One connection: a reader, up to 16 request workers, and a writer.

    The reader queues requests in ``_pending``; workers take them back to
    back and park only when none is left, so handing a request over costs
    no trip through the scheduler. Replies go to ``_outbox``; the writer,
    woken once per batch, sends everything queued in one gather-send, so a
    burst of 16 replies costs one system call (and whole replies never
    interleave). Requests count against the limit of 16 from the moment
    they are queued until their reply has left: the reader stops reading
    while the limit is reached, which bounds what one client can make us
    buffer.
    """

    def __init__(self, server: NbdServer, stream: trio.abc.Stream) -> None:
        self.server = server
        self.stream = stream
        self.transport = StreamTransport(stream)
        self.scope = trio.CancelScope()
        self.export: NbdExport | None = None
        self.conn = NbdConnection(
            server.lookup,
            server.list_exports,
            tls_available=server.tls is not None,
            tls_required=server.tls_required,
            multi_conn=server.max_connections != 1,
        )
        self._pending: deque[Request] = deque()
        self._in_flight = 0  # taken by a worker and not yet sent (at most 16)
        self._outbox: list = []
        self._outbox_replies = 0
        self._workers = 0
        self._idle_workers = 0
        self._work = trio.lowlevel.ParkingLot()  # idle workers
        self._room = trio.lowlevel.ParkingLot()  # the reader, while 16 are in flight
        self._flush = trio.lowlevel.ParkingLot()  # the writer, while nothing is queued
        self._closing = False
        self._hang_up = False
        self._sending = False  # the writer is in a send: only it may send

    async def run(self) -> None:
        with self.scope:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                handshake = trio.CancelScope(
                    deadline=trio.current_time() + self.server.handshake_timeout
                )
                with handshake:
                    await self._send_now(self.conn.data_to_send())
                    await self._read_loop(handshake)
                if handshake.cancelled_caught:
                    log.info("NBD client did not finish the handshake in time")
                self._closing = True  # workers finish what is queued, then the writer
                self._idle_workers -= len(self._work.unpark_all())
                self._flush.unpark_all()

    async def _send_now(self, data: bytes) -> None:
        """Handshake replies: the reader is alone, no writer yet."""
        if data:
            try:
                await self.transport.send_all(data)
            except _STREAM_GONE:
                self.scope.cancel()
                await trio.lowlevel.checkpoint()

    def _queue(self, reply, replies: int = 1, *, wake_writer: bool = True) -> None:
        if isinstance(reply, list):
            self._outbox.extend(reply)
        else:
            self._outbox.append(reply)
        self._outbox_replies += replies
        if wake_writer and self._flush:
            self._flush.unpark()

    def _send_queued_now(self) -> None:
        """The reader sends what is queued before it reads again, without a
        trip through the writer task, unless the writer is mid-send (then the
        order is the writer's). What the kernel does not take now is left to
        the writer."""
        if self._sending or not self._outbox:
            return
        buffers, self._outbox = self._outbox, []
        replies, self._outbox_replies = self._outbox_replies, 0
        rest = self.transport.send_buffers_now(buffers)
        if rest:
            self._outbox[:0] = rest
            self._outbox_replies += replies
            if self._flush:
                self._flush.unpark()
        else:
            self._sent(replies)

    def _sent(self, replies: int) -> None:
        """Replies have left: their slots are free."""
        self._in_flight -= replies
        for _ in range(min(len(self._pending), replies)):
            self._wake_worker()
        if self._room:
            self._room.unpark_all()
        if self._hang_up:
            self.scope.cancel()

    async def _read_loop(self, handshake: trio.CancelScope) -> None:
        conn = self.conn
        pending = self._pending
        receives = 0
        while True:
            while len(pending) + self._in_flight >= MAX_REQUESTS_IN_FLIGHT:
                await self._room.park()
            try:
                data = await self.transport.receive_some(RECEIVE_SIZE)
            except _STREAM_GONE:
                return
            if not data:
                return
            receives += 1
            if receives % 16 == 0:  # the fast transport never yields on its own
                await trio.lowlevel.checkpoint()
            burst: list[Request] = []
            for event in conn.receive_data(data):
                if type(event) is Request:
                    burst.append(event)
                    continue
                if burst:
                    self._take(burst)
                    burst = []
                if self.export is None:
                    await self._send_now(conn.data_to_send())
                else:
                    self._queue(conn.data_to_send(), 0)
                if type(event) is Negotiated:
                    self.export = event.export
                    self.server._attach(self, event.export)
                    handshake.deadline = math.inf
                    if isinstance(self.transport.stream, trio.SocketStream):
                        self.transport = SocketTransport(self.transport.stream)
                    self._nursery.start_soon(self._writer)
                elif type(event) is StartTls:
                    if not await self._start_tls():
                        return
                elif type(event) is Disconnect:
                    if event.reason:
                        log.info("NBD client disconnected: %s", event.reason)
                    return
            if burst:
                self._take(burst)
            rest = conn.data_to_send()  # errors for invalid requests
            if self.export is None:
                await self._send_now(rest)
                continue
            if rest:
                self._queue(rest, 0, wake_writer=False)
            try:
                self._send_queued_now()
            except _STREAM_GONE:
                return

    def _take(self, burst: list[Request]) -> None:
        """Answer at once the READs the export can serve without waiting, as
        many as there are free slots; queue the rest for the workers."""
        room = MAX_REQUESTS_IN_FLIGHT - self._in_flight
        now = [req for req in burst if req.command == Cmd.READ and not req.flags & CmdFlag.FUA][
            : max(room, 0)
        ]
        assert self.export is not None  # requests only follow Negotiated
        answered = dict(zip(map(id, now), reads_now(self.conn, self.export, now), strict=True))
        for req in burst:
            reply = answered.get(id(req))
            if reply is not None:
                self._in_flight += 1
                self._queue(reply, wake_writer=False)  # the reader sends it (_read_loop)
            else:
                self._pending.append(req)
                self._wake_worker()

    def _wake_worker(self) -> None:
        if self._in_flight >= MAX_REQUESTS_IN_FLIGHT:
            return  # the writer wakes one when a reply has left
        if self._idle_workers:
            self._idle_workers -= len(self._work.unpark())
        elif self._workers < MAX_REQUESTS_IN_FLIGHT:
            self._workers += 1
            self._nursery.start_soon(self._worker)

    async def _start_tls(self) -> bool:
        if self.conn.trailing_data():
            log.info("NBD client sent data before the TLS handshake")
            return False
        assert self.server.tls is not None  # StartTls needs tls_available
        tls_stream = trio.SSLStream(self.stream, self.server.tls, server_side=True)
        self.transport = StreamTransport(tls_stream)
        try:
            await tls_stream.do_handshake()
        except (trio.BrokenResourceError, ssl.SSLError) as e:
            log.info("NBD TLS handshake failed (%s)", type(e.__cause__ or e).__name__)
            return False
        events = self.conn.tls_established()
        assert not events, events  # nothing can have arrived yet
        return True

    async def _worker(self) -> None:
        conn, pending = self.conn, self._pending
        try:
            while True:
                while not pending or self._in_flight >= MAX_REQUESTS_IN_FLIGHT:
                    if self._closing and not pending:
                        return
                    self._idle_workers += 1
                    await self._work.park()
                req = pending.popleft()
                self._in_flight += 1
                assert self.export is not None  # requests only follow Negotiated
                reply = await execute(conn, self.export, req)
                self._queue(reply)
                if isinstance(reply, _Partial):
                    log.info("NBD client disconnected: reading from file failed")
                    self._hang_up = True
                    return
        finally:
            self._workers -= 1
            if self._closing and not self._workers:
                self._flush.unpark_all()

    async def _writer(self) -> None:
        while True:
            while not self._outbox:
                if self._closing and not self._workers:
                    return
                await self._flush.park()
            buffers, self._outbox = self._outbox, []
            replies, self._outbox_replies = self._outbox_replies, 0
            self._sending = True
            try:
                await self.transport.send_buffers(buffers)
            except _STREAM_GONE:
                self.scope.cancel()
                return
            finally:
                self._sending = False
            self._sent(replies)
            if self._hang_up:
                return
