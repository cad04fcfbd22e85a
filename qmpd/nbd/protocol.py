"""The server side of one NBD connection as a sans-IO state machine.

Theory of operation
-------------------
An :class:`NbdConnection` is fed the client's bytes with
:meth:`~NbdConnection.receive_data` and returns events (qmpd.nbd.events);
bytes for the client pile up in :meth:`~NbdConnection.data_to_send`, which
the edge drains before acting on the events. Nothing here touches a
socket, a clock or a thread, so every behaviour is testable with bytes.

The connection moves through the phases of :data:`TRANSITIONS` (a table,
as in h11's _state.py): HANDSHAKE (greeting and options, driven by the
generator of qmpd.nbd.handshake), TLS (paused while the edge runs the TLS
handshake), TRANSMISSION (requests), CLOSED. An event that would move the
phase checks the table; CLOSED is final, and feeding a closed connection
raises NbdProtocolError.

In TRANSMISSION each 28-byte request header (plus a WRITE's payload) is
checked as QEMU 7.2's nbd_co_receive_request() checks it. A request that
fails a check is answered at once, here (EINVAL and QEMU's text); a valid
one becomes a :class:`Request` for the edge, which runs it against the
export and builds the reply with :meth:`reply_ok`, :meth:`reply_error`,
:meth:`reply_read` or a :class:`BlockStatusReply`. Replies of different
requests may go out in any order, so those methods return bytes rather
than queueing them. A client that breaks the framing (bad magic, an
oversized WRITE whose payload QEMU will not read) gets QEMU's error reply
and a :class:`Disconnect`; so does NBD_CMD_DISC, without a reply.

The edge limits how many requests run at once (QEMU: 16); this class
parses whatever it is given, so the edge bounds its buffering by not
reading while its slots are full.
"""

from __future__ import annotations

import struct
from enum import Enum, auto

from qmpd.nbd.backend import ExportList, ExportLookup, NbdExport
from qmpd.nbd.constants import (
    CONTEXT_IDS,
    IHAVEOPT,
    MAX_BUFFER_SIZE,
    NBDMAGIC,
    REQUEST_MAGIC,
    Cmd,
    CmdFlag,
    HandshakeFlag,
    cmd_name,
)
from qmpd.nbd.events import (
    Disconnect,
    Event,
    NbdProtocolError,
    Negotiated,
    Request,
    StartTls,
)
from qmpd.nbd.handshake import Negotiation, Skip
from qmpd.nbd.transmission import (
    BlockStatusReply,
    error_reply,
    read_reply,
    simple_reply,
)


class Phase(Enum):
    HANDSHAKE = auto()
    TLS = auto()
    TRANSMISSION = auto()
    CLOSED = auto()


#: (phase, what happened) -> next phase. Anything else is a bug here.
TRANSITIONS: dict[tuple[Phase, type], Phase] = {
    (Phase.HANDSHAKE, StartTls): Phase.TLS,
    (Phase.TLS, StartTls): Phase.HANDSHAKE,  # tls_established()
    (Phase.HANDSHAKE, Negotiated): Phase.TRANSMISSION,
    (Phase.HANDSHAKE, Disconnect): Phase.CLOSED,
    (Phase.TLS, Disconnect): Phase.CLOSED,
    (Phase.TRANSMISSION, Disconnect): Phase.CLOSED,
}

GREETING = struct.pack(
    ">QQH", NBDMAGIC, IHAVEOPT, HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
)
_HEADER = struct.Struct(">IHHQQI")
HEADER_SIZE = _HEADER.size

_READ, _WRITE, _DISC, _CACHE = Cmd.READ, Cmd.WRITE, Cmd.DISC, Cmd.CACHE
_BLOCK_STATUS, _WRITE_ZEROES, _TRIM = Cmd.BLOCK_STATUS, Cmd.WRITE_ZEROES, Cmd.TRIM
_KNOWN = frozenset(
    {Cmd.READ, Cmd.WRITE, Cmd.FLUSH, Cmd.TRIM, Cmd.CACHE, Cmd.WRITE_ZEROES, Cmd.BLOCK_STATUS}
)
_SIZE_CAPPED = frozenset({Cmd.READ, Cmd.WRITE, Cmd.CACHE})
_WRITING = frozenset({Cmd.WRITE, Cmd.WRITE_ZEROES, Cmd.TRIM})
# Plain ints: ~ of an IntFlag would only cover the flags it knows.
_FUA, _DF = int(CmdFlag.FUA), int(CmdFlag.DF)
_VALID_FLAGS: dict[int, int] = {
    Cmd.WRITE_ZEROES: _FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO,
    Cmd.BLOCK_STATUS: _FUA | CmdFlag.REQ_ONE,
}
_VALID_FLAGS = {cmd: int(flags) for cmd, flags in _VALID_FLAGS.items()}


class NbdConnection:
    """One client, from greeting to goodbye."""

    def __init__(
        self,
        lookup: ExportLookup,
        list_exports: ExportList,
        *,
        tls_available: bool = False,
        tls_required: bool = False,
        multi_conn: bool = True,
    ) -> None:
        if tls_required and not tls_available:
            raise ValueError("TLS cannot be required without TLS credentials")
        self.phase = Phase.HANDSHAKE
        self._out: list[bytes] = [GREETING]
        self._buf = bytearray()
        self._negotiation = Negotiation(
            lookup,
            list_exports,
            self._out.append,
            tls_available=tls_available,
            tls_required=tls_required,
            multi_conn=multi_conn,
        )
        self._wire = self._negotiation.run()
        self._want: object = next(self._wire)
        self.export: NbdExport | None = None
        self.structured = False
        self._contexts: tuple[int, ...] = ()
        self._size = 0
        self._read_only = True

    # -- the surface -----------------------------------------------------
    def data_to_send(self) -> bytes:
        """The bytes produced since the last call (handshake and error replies)."""
        if not self._out:
            return b""
        data = b"".join(self._out)
        self._out.clear()
        return data

    def receive_data(self, data: bytes | bytearray) -> list[Event]:
        """Feed bytes from the client; returns what the edge must do, in order."""
        if self.phase is Phase.CLOSED:
            raise NbdProtocolError("connection is closed")
        if self.phase is Phase.TLS:
            return self._close("client sent data before the TLS handshake")
        events: list[Event] = []
        if self.phase is Phase.TRANSMISSION:
            self._parse_requests(data, events)
        else:
            self._buf += data
            self._drive_handshake(events)
        return events

    def tls_established(self) -> list[Event]:
        """The edge finished the TLS handshake: negotiation goes on, encrypted."""
        self._move(StartTls)
        events: list[Event] = []
        self._advance(None, events)
        return events

    def trailing_data(self) -> bytes:
        """Bytes received but not parsed (after StartTls they belong to TLS)."""
        return bytes(self._buf)

    # -- replies for the edge -------------------------------------------
    def reply_ok(self, request: Request) -> bytes:
        return simple_reply(request.cookie)

    def reply_error(self, request: Request, system_errno: int | None, message: str) -> bytes:
        return error_reply(self.structured, request.cookie, system_errno, message)

    def reply_read(self, request: Request, segments, done: bool = True) -> list:
        return read_reply(self.structured, request, segments, done)

    def block_status_reply(self, request: Request) -> BlockStatusReply:
        return BlockStatusReply(request)

    # -- phases -----------------------------------------------------------
    def _move(self, event_type: type) -> None:
        try:
            self.phase = TRANSITIONS[self.phase, event_type]
        except KeyError:
            raise NbdProtocolError(f"{event_type.__name__} in phase {self.phase.name}") from None

    def _close(self, reason: str) -> list[Event]:
        self._move(Disconnect)
        return [Disconnect(reason)]

    # -- handshake driver ---------------------------------------------------
    def _drive_handshake(self, events: list[Event]) -> None:
        buf = self._buf
        while self.phase is Phase.HANDSHAKE:
            want = self._want
            if isinstance(want, int):
                if len(buf) < want:
                    return
                value = bytes(buf[:want])
                del buf[:want]
                self._advance(value, events)
            elif isinstance(want, Skip):
                if not buf:
                    return
                n = min(len(buf), want.length)
                del buf[:n]
                if n < want.length:
                    self._want = Skip(want.length - n)
                    return
                self._advance(None, events)
            else:  # pragma: no cover - the generator yields nothing else
                raise TypeError(f"negotiation yielded {want!r}")

    def _advance(self, value: bytes | None, events: list[Event]) -> None:
        try:
            self._want = self._wire.send(value)
        except StopIteration as done:
            outcome = done.value
            self._move(type(outcome))
            events.append(outcome)
            if isinstance(outcome, Negotiated):
                self._enter_transmission(outcome.export, events)
            return
        except NbdProtocolError as e:
            events.extend(self._close(str(e)))
            return
        if isinstance(self._want, StartTls):
            self._move(StartTls)
            events.append(self._want)

    def _enter_transmission(self, export: NbdExport, events: list[Event]) -> None:
        neg = self._negotiation
        self.export = export
        self.structured = neg.structured
        self._size = export.size
        self._read_only = not export.writable
        if neg.meta.count:
            self._contexts = tuple(CONTEXT_IDS[c] for c in neg.meta.selected())
        leftover = bytes(self._buf)
        self._buf = bytearray()
        if leftover:
            self._parse_requests(leftover, events)

    # -- transmission -------------------------------------------------------
    def _parse_requests(self, data: bytes | bytearray, events: list[Event]) -> None:
        """Cut requests out of the stream: the hot path, kept flat on purpose."""
        buf = self._buf
        if buf:
            buf += data
            work: bytes | bytearray = buf
        else:
            work = data
        view = memoryview(work) if isinstance(work, bytes) else None
        pos, end = 0, len(work)
        unpack = _HEADER.unpack_from
        while end - pos >= HEADER_SIZE:
            magic, flags, command, cookie, offset, length = unpack(work, pos)
            payload = None
            if command == _WRITE and magic == REQUEST_MAGIC and length <= MAX_BUFFER_SIZE:
                stop = pos + HEADER_SIZE + length
                if stop > end:
                    break  # wait for the whole payload
                start = pos + HEADER_SIZE
                payload = view[start:stop] if view is not None else bytes(work[start:stop])
                pos = stop
            else:
                pos += HEADER_SIZE
            event = self._check(magic, flags, command, cookie, offset, length, payload)
            if event is not None:
                events.append(event)
                if type(event) is Disconnect:
                    self._buf = bytearray()
                    return
        if work is buf:
            del buf[:pos]
        elif pos < end:
            self._buf = bytearray(work[pos:])

    def _check(
        self, magic: int, flags: int, command: int, cookie: int, offset: int, length: int, payload
    ) -> Event | None:
        """QEMU 7.2's nbd_co_receive_request() and the front of nbd_handle_request()."""
        fail = None
        hang_up = False
        if magic != REQUEST_MAGIC:
            fail, hang_up = f"invalid magic (got 0x{magic:x})", True
        elif command == _DISC:
            self._move(Disconnect)
            return Disconnect()
        elif command in _SIZE_CAPPED and length > MAX_BUFFER_SIZE:
            fail = f"len ({length} ) is larger than max len ({MAX_BUFFER_SIZE})"
            hang_up = command == _WRITE  # QEMU did not read the payload: framing is lost
        elif self._read_only and command in _WRITING:
            fail = "Export is read-only"
        elif offset > self._size or length > self._size - offset:
            fail = f"operation past EOF; From: {offset}, Len: {length}, Size: {self._size}"
        elif flags & ~self._valid_flags(command):
            fail = f"unsupported flags for command {cmd_name(command)} (got 0x{flags:x})"
        elif command not in _KNOWN:
            fail = f"invalid request type ({command}) received"
        elif command == _BLOCK_STATUS:
            if not length:
                fail = "need non-zero length"
            elif not self._contexts:
                fail = "CMD_BLOCK_STATUS not negotiated"
            else:
                return Request(cookie, command, flags, offset, length, contexts=self._contexts)
        if fail is None:
            sparse = command == _READ and self.structured and length > 0 and not flags & _DF
            return Request(cookie, command, flags, offset, length, payload, sparse)
        self._out.append(error_reply(self.structured, cookie, None, fail))
        if hang_up:
            self._move(Disconnect)
            return Disconnect(
                fail if magic == REQUEST_MAGIC else "Request handling failed in intermediate state"
            )
        return None

    def _valid_flags(self, command: int) -> int:
        if command == _READ:
            return _FUA | _DF if self.structured else _FUA
        return _VALID_FLAGS.get(command, _FUA)
