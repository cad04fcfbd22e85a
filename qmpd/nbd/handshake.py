"""Fixed newstyle option negotiation, as QEMU 7.2's nbd/server.c does it.

The negotiation is written as one generator, :meth:`Negotiation.run`, that
reads like QEMU's nbd_negotiate_options(): it *yields* what it needs from
the wire and the driver (qmpd.nbd.protocol) resumes it when that arrived:

* ``yield n`` (an int): the next ``n`` bytes, sent back as ``bytes``;
* ``yield Skip(n)``: discard ``n`` bytes (streamed, never buffered whole:
  an option may be 32 MiB long);
* ``yield StartTls()``: pause until the edge has wrapped the transport.

Replies go out through the ``send`` callable as they are produced, so
the bytes and their order are QEMU's. The generator returns the final event
(:class:`Negotiated` or :class:`Disconnect`) or raises NbdProtocolError
where QEMU hangs up without a word.

Option payloads are parsed as QEMU parses them, field by field against the
remaining option length: a field longer than what is left is "Inconsistent
lengths in option %s", the rest of the option is dropped and the client may
try again (_Rejected unwinds the handler to the option loop).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import NoReturn, TypeAlias, TypeVar, cast

from qmpd.nbd.backend import ExportList, ExportLookup, NbdExport
from qmpd.nbd.constants import (
    ALLOCATION_DEPTH,
    BASE_ALLOCATION,
    CONTEXT_IDS,
    EXPORT_NAME_REPLY_ZEROES,
    IHAVEOPT,
    MAX_BUFFER_SIZE,
    MAX_STRING_SIZE,
    OPTION_REPLY_MAGIC,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    TransmissionFlag,
    opt_name,
)
from qmpd.nbd.events import Disconnect, NbdProtocolError, Negotiated, StartTls

#: The preferred block size QEMU 7.2 hard-codes (at least the minimum).
PREFERRED_BLOCK = 4096

_OPTION_HEADER = struct.Struct(">QII")
_REPLY_HEADER = struct.Struct(">QIII")


@dataclass(frozen=True, slots=True)
class Skip:
    length: int


class _Rejected(Exception):
    """The current option got an error reply; go on with the next one."""


@dataclass
class MetaContexts:
    """The meta contexts a SET_META_CONTEXT selected (QEMU's NBDExportMetaContexts)."""

    export: NbdExport | None = None
    base_allocation: bool = False
    allocation_depth: bool = False
    count: int = 0

    def selected(self) -> list[str]:
        names = [BASE_ALLOCATION] if self.base_allocation else []
        return names + ([ALLOCATION_DEPTH] if self.allocation_depth else [])


def transmission_flags(export: NbdExport, *, structured: bool, multi_conn: bool) -> int:
    """QEMU 7.2's exp->nbdflags, plus SEND_DF for structured clients.

    Read-only 0x58f and writable 0xded on the wire decode to: always
    HAS_FLAGS|SEND_FLUSH|SEND_FUA|SEND_CACHE; CAN_MULTI_CONN unless the
    server allows a single connection; READ_ONLY, or TRIM|WRITE_ZEROES|
    FAST_ZERO when writable; never ROTATIONAL.
    """
    flags = (
        TransmissionFlag.HAS_FLAGS
        | TransmissionFlag.SEND_FLUSH
        | TransmissionFlag.SEND_FUA
        | TransmissionFlag.SEND_CACHE
    )
    if multi_conn:
        flags |= TransmissionFlag.CAN_MULTI_CONN
    if export.writable:
        flags |= (
            TransmissionFlag.SEND_TRIM
            | TransmissionFlag.SEND_WRITE_ZEROES
            | TransmissionFlag.SEND_FAST_ZERO
        )
    else:
        flags |= TransmissionFlag.READ_ONLY
    if structured:
        flags |= TransmissionFlag.SEND_DF
    return int(flags)


def _sanitize(name: bytes) -> bytes:
    """QEMU's nbd_sanitize_name(): at most 80 bytes of a name in an error text."""
    return name if len(name) < 80 else name[:80] + b"..."


def _decode(name: bytes) -> str:
    return name.decode("utf-8", "surrogateescape")


_T = TypeVar("_T")

#: What the negotiation asks of its driver: ``n`` bytes, a skip, a pause for TLS.
Want: TypeAlias = int | Skip | StartTls
#: A step of the negotiation: yields :data:`Want`, is sent the bytes an int
#: asked for (None after a Skip or StartTls), returns ``_T``. A generator's
#: send type cannot depend on what it yielded, so ``cast(bytes, (yield n))``
#: records that an int is always answered with bytes.
Wire: TypeAlias = Generator[Want, bytes | None, _T]
#: What an option handler ends with: the final event, or None to go on.
Outcome: TypeAlias = Negotiated | Disconnect | None


@dataclass
class Negotiation:
    """The option phase of one client (QEMU's NBDClient, handshake fields)."""

    lookup: ExportLookup
    list_exports: ExportList
    send: Callable[[bytes], None]
    tls_available: bool = False
    tls_required: bool = False
    multi_conn: bool = True
    tls_active: bool = False
    fixed_newstyle: bool = False
    no_zeroes: bool = False
    structured: bool = False
    meta: MetaContexts = field(default_factory=MetaContexts)
    export: NbdExport | None = None
    opt: int = 0
    optlen: int = 0

    # -- replies --------------------------------------------------------
    def _reply(self, rep: int, payload: bytes = b"") -> None:
        self.send(_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, self.opt, rep, len(payload)) + payload)

    def _error(self, rep: int, text: str | bytes) -> None:
        self._reply(rep, text.encode() if isinstance(text, str) else text)

    def _drop_and_error(self, rep: int, text: str | bytes) -> Wire[None]:
        """QEMU's nbd_opt_drop(): discard the rest of the option, then reply."""
        if self.optlen:
            yield Skip(self.optlen)
            self.optlen = 0
        self._error(rep, text)

    def _invalid(self, text: str | bytes) -> Wire[NoReturn]:
        yield from self._drop_and_error(Rep.ERR_INVALID, text)
        raise _Rejected

    def _reject_length(self, *, fatal: bool) -> Wire[NoReturn]:
        """QEMU's nbd_reject_length(): a payload where none (or less) belongs."""
        text = f"option '{opt_name(self.opt)}' has unexpected length"
        yield from self._drop_and_error(Rep.ERR_INVALID, text)
        if fatal:
            raise NbdProtocolError(text)
        raise _Rejected

    # -- reading the option payload --------------------------------------
    def _read(self, size: int, *, check_nul: bool = False) -> Wire[bytes]:
        """QEMU's nbd_opt_read()."""
        if size > self.optlen:
            yield from self._invalid(f"Inconsistent lengths in option {opt_name(self.opt)}")
        self.optlen -= size
        data = cast(bytes, (yield size)) if size else b""
        if check_nul and b"\0" in data:
            yield from self._invalid(f"Unexpected embedded NUL in option {opt_name(self.opt)}")
        return data

    def _read_u32(self) -> Wire[int]:
        return int.from_bytes((yield from self._read(4)), "big")

    def _read_name(self) -> Wire[bytes]:
        """QEMU's nbd_opt_read_name(): a u32 length, then that many bytes."""
        length = yield from self._read_u32()
        if length > MAX_STRING_SIZE:
            yield from self._invalid(f"Invalid name length: {length}")
        return (yield from self._read(length, check_nul=True))

    # -- the option loop -------------------------------------------------
    def run(self) -> Wire[Negotiated | Disconnect]:
        """QEMU's nbd_negotiate_options(), after the greeting."""
        flags = int.from_bytes(cast(bytes, (yield 4)), "big")
        self.fixed_newstyle = bool(flags & HandshakeFlag.FIXED_NEWSTYLE)
        self.no_zeroes = bool(flags & HandshakeFlag.NO_ZEROES)
        unknown = flags & ~int(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES)
        if unknown:
            raise NbdProtocolError(f"Unknown client flags 0x{unknown:x} received")
        while True:
            magic, self.opt, self.optlen = _OPTION_HEADER.unpack(cast(bytes, (yield 16)))
            if magic != IHAVEOPT:
                raise NbdProtocolError("Bad magic received")
            if self.optlen > MAX_BUFFER_SIZE:
                raise NbdProtocolError(
                    f"len ({self.optlen} ) is larger than max len ({MAX_BUFFER_SIZE})"
                )
            try:
                if self.tls_required and not self.tls_active:
                    outcome = yield from self._before_tls()
                elif self.fixed_newstyle:
                    handler = _HANDLERS.get(self.opt, Negotiation._unsupported)
                    outcome = yield from handler(self)
                elif self.opt == Opt.EXPORT_NAME:
                    outcome = yield from self._export_name()
                else:
                    raise NbdProtocolError(f"Unsupported option {self.opt} ({opt_name(self.opt)})")
            except _Rejected:
                continue
            if outcome is not None:
                return outcome

    def _before_tls(self) -> Wire[Outcome]:
        if not self.fixed_newstyle:
            raise NbdProtocolError(f"Unsupported option 0x{self.opt:x}")
        if self.opt == Opt.STARTTLS:
            if self.optlen:
                yield from self._reject_length(fatal=True)
            yield from self._start_tls()
            return None
        if self.opt == Opt.EXPORT_NAME:
            raise NbdProtocolError(f"Option 0x{self.opt:x} not permitted before TLS")
        yield from self._drop_and_error(
            Rep.ERR_TLS_REQD, f"Option 0x{self.opt:x} not permitted before TLS"
        )
        return Disconnect() if self.opt == Opt.ABORT else None

    def _start_tls(self) -> Wire[None]:
        self._reply(Rep.ACK)
        yield StartTls()
        self.tls_active = True
        return None

    # -- option handlers (QEMU's switch in nbd_negotiate_options) ----------
    def _unsupported(self) -> Wire[None]:
        yield from self._drop_and_error(
            Rep.ERR_UNSUP, f"Unsupported option {self.opt} ({opt_name(self.opt)})"
        )

    def _list(self) -> Wire[None]:
        if self.optlen:
            yield from self._reject_length(fatal=False)
        for export in self.list_exports():
            name = export.name.encode("utf-8", "surrogateescape")
            desc = (export.description or "").encode("utf-8", "surrogateescape")
            self._reply(Rep.SERVER, len(name).to_bytes(4, "big") + name + desc)
        self._reply(Rep.ACK)

    def _abort(self) -> Wire[Disconnect]:
        # The spec wants a reply, but clients may hang up before reading it.
        self._reply(Rep.ACK)
        return Disconnect()
        yield  # pragma: no cover  (a generator, like the other handlers)

    def _starttls(self) -> Wire[None]:
        if self.optlen:
            yield from self._reject_length(fatal=False)
        if self.tls_active:
            self._error(Rep.ERR_INVALID, "TLS already enabled")
        elif self.tls_available:
            return (yield from self._start_tls())
        else:
            self._error(Rep.ERR_POLICY, "TLS not configured")

    def _structured_reply(self) -> Wire[None]:
        if self.optlen:
            yield from self._reject_length(fatal=False)
        if self.structured:
            self._error(Rep.ERR_INVALID, "structured reply already negotiated")
        else:
            self._reply(Rep.ACK)
            self.structured = True

    def _export_name(self) -> Wire[Negotiated]:
        """QEMU's nbd_negotiate_handle_export_name(): errors can only hang up."""
        if self.optlen > MAX_STRING_SIZE:
            raise NbdProtocolError("Bad length received")
        name = cast(bytes, (yield self.optlen)) if self.optlen else b""
        self.optlen = 0
        export = self.lookup(_decode(name))
        if export is None:
            raise NbdProtocolError("export not found")
        flags = transmission_flags(export, structured=self.structured, multi_conn=self.multi_conn)
        reply = struct.pack(">QH", export.size, flags)
        self.send(reply if self.no_zeroes else reply + bytes(EXPORT_NAME_REPLY_ZEROES))
        return self._choose(export)

    def _choose(self, export: NbdExport) -> Negotiated:
        self.export = export
        if self.meta.export is not export:  # QEMU's nbd_check_meta_export()
            self.meta.count = 0
        return Negotiated(export)

    def _info(self, info: int, payload: bytes) -> None:
        self._reply(Rep.INFO, info.to_bytes(2, "big") + payload)

    def _info_or_go(self) -> Wire[Negotiated | None]:
        """QEMU's nbd_negotiate_handle_info()."""
        name = yield from self._read_name()
        count = int.from_bytes((yield from self._read(2)), "big")
        wanted = yield from self._read(2 * count)
        requests = struct.unpack(f">{count}H", wanted)
        if self.optlen:
            yield from self._reject_length(fatal=False)
        export = self.lookup(_decode(name))
        if export is None:
            self._error(Rep.ERR_UNKNOWN, b"export '" + _sanitize(name) + b"' not present")
            return None
        block_size_requested = Info.BLOCK_SIZE in requests
        if Info.NAME in requests:
            self._info(Info.NAME, name)
        if export.description is not None:
            self._info(Info.DESCRIPTION, export.description.encode("utf-8", "surrogateescape"))
        # Minimum 1 for old clients; the real alignment if the client will obey it.
        minimum = export.min_block if self.opt == Opt.INFO or block_size_requested else 1
        self._info(
            Info.BLOCK_SIZE,
            struct.pack(">III", minimum, max(PREFERRED_BLOCK, minimum), MAX_BUFFER_SIZE),
        )
        flags = transmission_flags(export, structured=self.structured, multi_conn=self.multi_conn)
        self._info(Info.EXPORT, struct.pack(">QH", export.size, flags))
        if self.opt == Opt.INFO and not block_size_requested and export.min_block > 1:
            self._error(Rep.ERR_BLOCK_SIZE_REQD, "request NBD_INFO_BLOCK_SIZE to use this export")
            return None
        self._reply(Rep.ACK)
        return self._choose(export) if self.opt == Opt.GO else None

    def _meta_context(self) -> Wire[None]:
        """QEMU's nbd_negotiate_meta_queries(), LIST and SET."""
        listing = self.opt == Opt.LIST_META_CONTEXT
        if not self.structured and not listing:
            yield from self._invalid(
                f"request option '{opt_name(self.opt)}' when structured reply is not negotiated"
            )
        meta = MetaContexts()
        if not listing:
            self.meta = meta  # SET forgets the old selection, even if it fails
        name = yield from self._read_name()
        meta.export = self.lookup(_decode(name))
        if meta.export is None:
            yield from self._drop_and_error(
                Rep.ERR_UNKNOWN, b"export '" + _sanitize(name) + b"' not present"
            )
            return None
        queries = yield from self._read_u32()
        if listing and not queries:
            meta.base_allocation = True
            meta.allocation_depth = meta.export.allocation_depth
        for _ in range(queries):
            length = yield from self._read_u32()
            if length > MAX_STRING_SIZE:  # QEMU skips what it cannot match
                if length > self.optlen:
                    yield from self._invalid(f"Inconsistent lengths in option {opt_name(self.opt)}")
                self.optlen -= length
                yield Skip(length)
                continue
            self._match_query(meta, (yield from self._read(length, check_nul=True)), listing)
        if self.optlen:
            # QEMU 7.2 asserts here (an abort of the whole daemon); we refuse the option.
            yield from self._reject_length(fatal=False)
        for context in meta.selected():
            context_id = 0 if listing else CONTEXT_IDS[context]
            self._reply(Rep.META_CONTEXT, context_id.to_bytes(4, "big") + context.encode())
        self._reply(Rep.ACK)
        meta.count = len(meta.selected())
        return None

    @staticmethod
    def _match_query(meta: MetaContexts, query: bytes, listing: bool) -> None:
        """QEMU's nbd_meta_base_query() and nbd_meta_qemu_query()."""
        if query.startswith(b"base:"):
            rest = query[5:]
            if (listing and not rest) or rest == b"allocation":
                meta.base_allocation = True
        elif query.startswith(b"qemu:"):
            rest = query[5:]
            if (listing and not rest) or rest == b"allocation-depth":
                assert meta.export is not None  # _meta_context() found it first
                meta.allocation_depth = meta.export.allocation_depth


_HANDLERS: dict[int, Callable[[Negotiation], Wire[Outcome]]] = {
    Opt.LIST: Negotiation._list,
    Opt.ABORT: Negotiation._abort,
    Opt.EXPORT_NAME: Negotiation._export_name,
    Opt.INFO: Negotiation._info_or_go,
    Opt.GO: Negotiation._info_or_go,
    Opt.STARTTLS: Negotiation._starttls,
    Opt.STRUCTURED_REPLY: Negotiation._structured_reply,
    Opt.LIST_META_CONTEXT: Negotiation._meta_context,
    Opt.SET_META_CONTEXT: Negotiation._meta_context,
}
