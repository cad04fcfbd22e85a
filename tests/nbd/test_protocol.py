"""The sans-IO state machine: handshake, TLS, framing, requests, replies.

The byte-exact comparison with qemu-storage-daemon is test_qsd_wire.py;
these tests cover what a recording cannot: TLS states, split input,
streaming of huge options, backend errors, context bookkeeping.
"""

from __future__ import annotations

import errno
import struct

import pytest

from qmpd.nbd import constants as c
from qmpd.nbd.constants import Cmd, CmdFlag, Info, Opt
from qmpd.nbd.events import Disconnect, NbdProtocolError, Negotiated, Request, StartTls
from qmpd.nbd.handshake import transmission_flags
from qmpd.nbd.protocol import GREETING, NbdConnection, Phase
from qmpd.nbd.server import execute
from tests.nbd import scenarios
from tests.nbd.decode import decode
from tests.nbd.helpers import connection, handshake, negotiated, run
from tests.nbd.memory import MemoryExport
from tests.nbd.wire import info_payload, meta_payload, option, request


def test_greeting_is_fixed_newstyle_no_zeroes() -> None:
    conn, _ = connection()
    assert GREETING == b"NBDMAGICIHAVEOPT\x00\x03"
    assert conn.phase is Phase.HANDSHAKE


def test_transmission_flags_rule() -> None:
    ro = MemoryExport("a", 512, writable=False)
    rw = MemoryExport("b", 512)
    assert transmission_flags(ro, structured=True, multi_conn=True) == 0x58F
    assert transmission_flags(rw, structured=True, multi_conn=True) == 0xDED
    assert transmission_flags(rw, structured=False, multi_conn=True) == 0xD6D
    assert transmission_flags(ro, structured=False, multi_conn=False) == 0x40F


@pytest.mark.parametrize("chunk", [1, 3, 7, 28, 1000])
async def test_split_input_gives_the_same_bytes(chunk: int) -> None:
    # Valid requests only: an invalid one is answered while parsing, so its
    # reply may overtake replies of requests parsed in the same chunk.
    data = handshake(contexts=[b"base:allocation"]) + b"".join([
        request(Cmd.READ, 0, 4096, cookie=1),
        request(Cmd.WRITE, 100, 600, cookie=2, payload=bytes(range(200)) * 3),
        request(Cmd.BLOCK_STATUS, 0, 1 << 20, cookie=3)])
    whole, _ = await run(connection()[0], data)
    conn, _ = connection()
    pieces = [await run(conn, data[i:i + chunk]) for i in range(0, len(data), chunk)]
    assert b"".join(p for p, _ in pieces) == whole


def test_pipelined_requests_come_out_in_order() -> None:
    conn, _ = negotiated()
    events = conn.receive_data(b"".join(request(Cmd.READ, i * 512, 512, cookie=i)
                                        for i in range(20)))
    assert [e.cookie for e in events] == list(range(20))
    assert all(e.sparse for e in events)


def test_write_payload_waits_for_all_bytes() -> None:
    conn, _ = negotiated()
    payload = bytes(range(256)) * 4
    data = request(Cmd.WRITE, 0, len(payload), cookie=9, payload=payload)
    assert conn.receive_data(data[:500]) == []
    (event,) = conn.receive_data(data[500:])
    assert bytes(event.payload) == payload and event.cookie == 9
    assert "payload" not in repr(event) and "WRITE" in repr(event)


def test_requests_pipelined_behind_go_are_parsed() -> None:
    conn, _ = connection()
    events = conn.receive_data(handshake() + request(Cmd.FLUSH, cookie=5))
    assert [type(e) for e in events] == [Negotiated, Request]


def test_huge_unknown_option_is_streamed_not_buffered() -> None:
    conn, _ = connection()
    conn.receive_data(scenarios.FIXED + struct.pack(">QII", c.IHAVEOPT, 77, c.MAX_BUFFER_SIZE))
    block = bytes(1 << 20)
    for _ in range(32):
        assert conn.receive_data(block) == []
        assert len(conn.trailing_data()) == 0
    assert b"Unsupported option 77" in conn.data_to_send()
    assert conn.phase is Phase.HANDSHAKE


def test_option_longer_than_32_mib_hangs_up() -> None:
    conn, _ = connection()
    events = conn.receive_data(scenarios.FIXED + struct.pack(">QII", c.IHAVEOPT, Opt.LIST,
                                                             c.MAX_BUFFER_SIZE + 1))
    assert events == [Disconnect("len (33554433 ) is larger than max len (33554432)")]
    with pytest.raises(NbdProtocolError):
        conn.receive_data(b"more")


def test_tls_required_flow() -> None:
    conn, _ = connection(tls_available=True, tls_required=True)
    assert conn.receive_data(scenarios.FIXED + option(Opt.STARTTLS)) == [StartTls()]
    assert decode(conn.data_to_send()) == ["option-reply opt=5 ACK b''"]
    assert conn.phase is Phase.TLS
    assert conn.tls_established() == []
    events = conn.receive_data(option(Opt.STARTTLS) + scenarios.SR + scenarios.go(b"ro"))
    assert type(events[-1]) is Negotiated
    replies = decode(conn.data_to_send())
    assert replies[0] == "option-reply opt=5 ERR_INVALID b'TLS already enabled'"
    assert replies[1] == "option-reply opt=8 ACK b''"


def test_bytes_before_tls_handshake_close() -> None:
    conn, _ = connection(tls_available=True, tls_required=True)
    assert conn.receive_data(scenarios.FIXED + option(Opt.STARTTLS) + b"\x16\x03") == [StartTls()]
    assert conn.trailing_data() == b"\x16\x03"
    events = conn.receive_data(b"more")
    assert type(events[0]) is Disconnect and conn.phase is Phase.CLOSED


def test_optional_tls_allows_both() -> None:
    conn, _ = connection(tls_available=True)
    assert type(conn.receive_data(scenarios.FIXED + scenarios.go(b"ro"))[-1]) is Negotiated
    conn, _ = connection(tls_available=True)
    assert conn.receive_data(scenarios.FIXED + option(Opt.STARTTLS)) == [StartTls()]


def test_tls_required_needs_credentials() -> None:
    with pytest.raises(ValueError):
        connection(tls_required=True)


def test_multi_conn_off_for_single_connection_servers() -> None:
    conn, _ = connection(multi_conn=False)
    conn.receive_data(scenarios.FIXED + option(Opt.INFO, info_payload(b"ro")))
    export_info = [l for l in decode(conn.data_to_send()) if "INFO b'\\x00\\x00" in l]
    assert export_info and export_info[0].endswith("\\x04\\x0f'")


def test_meta_context_trailing_bytes_are_refused() -> None:
    """QEMU 7.2 asserts (aborts) here; we answer the option with an error."""
    conn, _ = connection()
    conn.receive_data(scenarios.FIXED + scenarios.SR + option(
        Opt.SET_META_CONTEXT, meta_payload(b"disk", [b"base:allocation"]) + b"junk"))
    replies = decode(conn.data_to_send())
    assert replies[-1] == ("option-reply opt=10 ERR_INVALID "
                           "b\"option 'set meta context' has unexpected length\"")


def test_info_block_size_minimum_follows_qemu() -> None:
    conn, _ = connection()
    conn.receive_data(scenarios.FIXED + option(Opt.GO, info_payload(b"aligned",
                                                                      (Info.BLOCK_SIZE,))))
    sizes = next(l for l in decode(conn.data_to_send()) if "\\x00\\x03" in l)
    assert "\\x00\\x00\\x10\\x00\\x00\\x00\\x10\\x00\\x02\\x00\\x00\\x00" in sizes


def test_contexts_reported_in_block_status_order() -> None:
    conn, _ = negotiated(contexts=[b"qemu:allocation-depth", b"base:allocation"])
    (event,) = conn.receive_data(request(Cmd.BLOCK_STATUS, 0, 4096))
    assert event.contexts == (0, 1)


# -- requests against a backend ----------------------------------------------------

async def _one(conn, data: bytes) -> list[str]:
    out, _ = await run(conn, data)
    return decode(out)


@pytest.mark.parametrize("op,cmd,flags,text", [
    ("read", Cmd.READ, CmdFlag.DF, "reading from file failed"),
    ("write", Cmd.WRITE, 0, "writing to file failed"),
    ("write_zeroes", Cmd.WRITE_ZEROES, 0, "writing to file failed"),
    ("flush", Cmd.FLUSH, 0, "flush failed"),
    ("flush", Cmd.READ, CmdFlag.FUA, "flush failed"),
    ("trim", Cmd.TRIM, 0, "discard failed"),
    ("flush", Cmd.TRIM, CmdFlag.FUA, "discard failed"),
    ("cache", Cmd.CACHE, 0, "caching data failed"),
    ("block_status", Cmd.BLOCK_STATUS, 0, "can't get block status"),
    ("block_status", Cmd.READ, 0, "unable to check for holes: No space left on device"),
])
async def test_backend_errors_carry_qemus_texts(op, cmd, flags, text) -> None:
    conn, catalog = negotiated(contexts=[b"base:allocation"])
    catalog.exports["disk"].fail[op] = errno.ENOSPC
    payload = bytes(512) if cmd == Cmd.WRITE else b""
    lines = await _one(conn, request(cmd, 0, 512, flags=flags, cookie=3, payload=payload))
    assert lines == [f"chunk cookie=3 ERROR flags=1 error=28 {text.encode()!r}"]


@pytest.mark.parametrize("err,wire", [
    (errno.EPERM, 1), (errno.EROFS, 1), (errno.EIO, 5), (errno.ENOMEM, 12), (errno.EINVAL, 22),
    (errno.ENOSPC, 28), (errno.EDQUOT, 28), (errno.EFBIG, 28), (errno.EOVERFLOW, 75),
    (errno.ENOTSUP, 95), (errno.ESHUTDOWN, 108), (errno.EBADF, 22), (errno.ENOENT, 22),
    (None, 22)])
def test_errno_mapping_is_qemus(err, wire) -> None:
    assert c.nbd_errno(err) == wire


async def test_simple_replies_carry_only_the_errno() -> None:
    conn, catalog = negotiated(structured=False)
    catalog.exports["disk"].fail["write_zeroes"] = errno.ENOTSUP
    assert await _one(conn, request(Cmd.WRITE_ZEROES, 0, 512, flags=CmdFlag.FAST_ZERO,
                                    cookie=8)) == ["simple cookie=8 error=95"]


async def test_sparse_read_error_after_data_hangs_up() -> None:
    conn, catalog = negotiated()
    exp = catalog.exports["disk"]
    exp.fail["read"] = errno.EIO
    (event,) = conn.receive_data(request(Cmd.READ, 0, 4096))
    reply = await execute(conn, exp, event)
    assert type(reply).__name__ == "_Partial" and reply == []


async def test_block_status_caps_and_merges() -> None:
    conn, catalog = negotiated(contexts=[b"base:allocation", b"qemu:allocation-depth"])
    exp = catalog.exports["disk"]
    exp.pages[:] = bytes(i % 2 for i in range(len(exp.pages)))  # alternate hole/data
    lines = await _one(conn, request(Cmd.BLOCK_STATUS, 0, 1 << 20, cookie=1))
    assert lines[0].count("),") == 255  # 256 alternating extents
    assert lines[1] == "chunk cookie=1 BLOCK_STATUS flags=1 context=1 extents=[(1048576, 1)]"
    lines = await _one(conn, request(Cmd.BLOCK_STATUS, 0, 1 << 20, flags=CmdFlag.REQ_ONE))
    assert "extents=[(4096, 3)]" in lines[0] and "extents=[(1048576, 1)]" in lines[1]


async def test_write_zeroes_flags_reach_the_backend() -> None:
    seen = []

    class Spy(MemoryExport):
        async def write_zeroes(self, offset, length, *, may_unmap, fua, fast):
            seen.append((may_unmap, fua, fast))

    conn = NbdConnection(lambda n: Spy("disk", 1 << 20), list)
    conn.receive_data(handshake(structured=False))
    conn.data_to_send()
    for flags in (0, CmdFlag.NO_HOLE | CmdFlag.FUA, CmdFlag.FAST_ZERO):
        await run(conn, request(Cmd.WRITE_ZEROES, 0, 512, flags=flags))
    assert seen == [(True, False, False), (False, True, False), (True, False, True)]


async def test_read_zero_length_structured_is_a_none_chunk() -> None:
    conn, _ = negotiated()
    assert await _one(conn, request(Cmd.READ, 0, 0, cookie=4)) == ["chunk cookie=4 NONE flags=1 "]


def test_receive_after_disconnect_raises() -> None:
    conn, _ = negotiated()
    assert conn.receive_data(request(Cmd.DISC)) == [Disconnect()]
    with pytest.raises(NbdProtocolError):
        conn.receive_data(b"x")
