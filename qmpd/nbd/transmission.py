"""The transmission phase: request checks and reply bytes, as QEMU 7.2.

Checks run in the order of QEMU's nbd_co_receive_request(), and every
failure goes on the wire as EINVAL whatever its errno inside QEMU (nbd_trip
sends -EINVAL with the error text): read-only export, past EOF, unknown
flags, unknown command. With structured replies the text travels in an
NBD_REPLY_TYPE_ERROR chunk; simple replies carry only the errno.

QEMU answers successful commands other than READ and BLOCK_STATUS with a
simple reply even when structured replies were negotiated, and so do we.
"""

from __future__ import annotations

import os
import struct
from array import array
from collections.abc import Iterable, Sequence

from qmpd.nbd.backend import ExtentLike
from qmpd.nbd.constants import (
    BASE_ALLOCATION,
    CONTEXT_IDS,
    MAX_BLOCK_STATUS_EXTENTS,
    REPLY_FLAG_DONE,
    SIMPLE_REPLY_MAGIC,
    STATE_HOLE,
    STATE_ZERO,
    STRUCTURED_REPLY_MAGIC,
    CmdFlag,
    ReplyType,
    nbd_errno,
)
from qmpd.nbd.events import Request

_SIMPLE = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")
_DATA_CHUNK = struct.Struct(">IHHQIQ")
_HOLE_CHUNK = struct.Struct(">IHHQIQI")
_ERROR_CHUNK = struct.Struct(">IHHQIIH")
_STATUS_CHUNK = struct.Struct(">IHHQII")

_BIG_ENDIAN_HOST = array("I", [1]).tobytes()[0] == 0


def simple_reply(cookie: int, error: int = 0, data: bytes = b"") -> bytes:
    header = _SIMPLE.pack(SIMPLE_REPLY_MAGIC, error, cookie)
    return header + data if data else header


def error_reply(structured: bool, cookie: int, system_errno: int | None, message: str) -> bytes:
    """QEMU's nbd_send_generic_reply() for a failure."""
    err = nbd_errno(system_errno)
    if not structured:
        return _SIMPLE.pack(SIMPLE_REPLY_MAGIC, err, cookie)
    text = message.encode()
    return (
        _ERROR_CHUNK.pack(
            STRUCTURED_REPLY_MAGIC,
            REPLY_FLAG_DONE,
            ReplyType.ERROR,
            cookie,
            6 + len(text),
            err,
            len(text),
        )
        + text
    )


def read_reply(
    structured: bool,
    request: Request,
    segments: Sequence[tuple[int, bytes | bytearray | memoryview | None]],
    done: bool = True,
) -> list:
    """The reply to a READ as buffers to send in order (header, payload...).

    ``segments``: ``(length, data)`` runs from the request's offset; data
    None is a run that reads as zeroes, sent as a hole chunk (only sparse
    reads have those). ``done`` False: more chunks (an error) follow.
    """
    if not structured:
        return [
            _SIMPLE.pack(SIMPLE_REPLY_MAGIC, 0, request.cookie),
            *(data if data is not None else bytes(n) for n, data in segments),
        ]
    if not segments:
        if not done:
            return []
        return [
            _CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ReplyType.NONE, request.cookie, 0)
        ]
    out: list = []
    offset, last = request.offset, len(segments) - 1
    for i, (length, data) in enumerate(segments):
        flags = REPLY_FLAG_DONE if done and i == last else 0
        if data is None:
            out.append(
                _HOLE_CHUNK.pack(
                    STRUCTURED_REPLY_MAGIC,
                    flags,
                    ReplyType.OFFSET_HOLE,
                    request.cookie,
                    12,
                    offset,
                    length,
                )
            )
        else:
            out.append(
                _DATA_CHUNK.pack(
                    STRUCTURED_REPLY_MAGIC,
                    flags,
                    ReplyType.OFFSET_DATA,
                    request.cookie,
                    8 + length,
                    offset,
                )
            )
            out.append(data)
        offset += length
    return out


def base_allocation_flags(extent: ExtentLike) -> int:
    return (0 if extent.data else STATE_HOLE) | (STATE_ZERO if extent.zero else 0)


def allocation_depth_flags(extent: ExtentLike) -> int:
    return 1 if extent.allocated else 0


class _ExtentArray:
    """QEMU's NBDExtentArray: merges runs with equal flags, stops when full."""

    def __init__(self, context_id: int, capacity: int) -> None:
        self.context_id = context_id
        self.flags_of = (
            base_allocation_flags
            if context_id == CONTEXT_IDS[BASE_ALLOCATION]
            else allocation_depth_flags
        )
        self.capacity = capacity
        self.lengths: list[int] = []
        self.flags: list[int] = []
        self.full = False

    def add(self, length: int, flags: int) -> None:
        if self.full or not length:
            return
        if self.flags and self.flags[-1] == flags and self.lengths[-1] + length <= 0xFFFFFFFF:
            self.lengths[-1] += length
        elif len(self.lengths) >= self.capacity:
            self.full = True
        else:
            self.lengths.append(length)
            self.flags.append(flags)

    def payload(self) -> bytes:
        pairs = array("I", [0]) * (2 * len(self.lengths))
        pairs[0::2] = array("I", self.lengths)
        pairs[1::2] = array("I", self.flags)
        if not _BIG_ENDIAN_HOST:
            pairs.byteswap()
        return pairs.tobytes()


class BlockStatusReply:
    """Collects extents for every negotiated context of one BLOCK_STATUS.

    The edge feeds backend extents until :attr:`done`; each context stops
    on its own when its array is full (one extent with REQ_ONE, QEMU's
    NBD_MAX_BLOCK_STATUS_EXTENTS otherwise) or the range is covered.
    """

    def __init__(self, request: Request) -> None:
        capacity = 1 if request.flags & CmdFlag.REQ_ONE else MAX_BLOCK_STATUS_EXTENTS
        self.request = request
        self.arrays = [_ExtentArray(cid, capacity) for cid in request.contexts]
        self.next_offset = request.offset
        self.end = request.offset + request.length

    @property
    def done(self) -> bool:
        return self.next_offset >= self.end or all(a.full for a in self.arrays)

    def feed(self, extents: Iterable[ExtentLike]) -> None:
        """Add extents that start at :attr:`next_offset` (clipped to the request)."""
        for extent in extents:
            length = min(extent.length, self.end - self.next_offset)
            if length <= 0:
                break
            for arr in self.arrays:
                arr.add(length, arr.flags_of(extent))
            self.next_offset += length

    def reply(self) -> bytes:
        chunks, last = [], len(self.arrays) - 1
        for i, arr in enumerate(self.arrays):
            payload = arr.payload()
            chunks.append(
                _STATUS_CHUNK.pack(
                    STRUCTURED_REPLY_MAGIC,
                    REPLY_FLAG_DONE if i == last else 0,
                    ReplyType.BLOCK_STATUS,
                    self.request.cookie,
                    4 + len(payload),
                    arr.context_id,
                )
            )
            chunks.append(payload)
        return b"".join(chunks)


def strerror(system_errno: int | None) -> str:
    """The text of an errno, as QEMU's "unable to check for holes: %s" has it."""
    return os.strerror(system_errno) if system_errno else "Unknown error"
