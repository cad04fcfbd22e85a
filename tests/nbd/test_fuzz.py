"""Random bytes into the state machine: events or a clean close, nothing else.

Three starting points: a fresh connection, one that requires TLS, and one
already in transmission. Whatever arrives, in whatever pieces, the machine
returns events of its own types (or raises NbdProtocolError once closed),
every Request it lets through is one the backend can run, and running it
yields a reply.
"""

from __future__ import annotations

import itertools
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmpd.nbd.constants import IHAVEOPT, REQUEST_MAGIC, Cmd, Opt
from qmpd.nbd.events import Disconnect, NbdProtocolError, Negotiated, Request, StartTls
from qmpd.nbd.protocol import Phase
from qmpd.nbd.server import execute
from tests.nbd import scenarios
from tests.nbd.helpers import connection, negotiated

EVENT_TYPES = (Disconnect, Negotiated, Request, StartTls)

# Bytes that look like the protocol often enough to get deep into it.
_option = st.builds(lambda o, d: struct.pack(">QII", IHAVEOPT, o, len(d)) + d,
                    st.sampled_from([*Opt, 0, 11, 99]), st.binary(max_size=64))
_names = st.sampled_from([b"disk", b"ro", b"aligned", b"", b"nope"])
_go = st.builds(lambda n, r: struct.pack(">QII", IHAVEOPT, Opt.GO, 6 + len(n)) +
                struct.pack(">I", len(n)) + n + struct.pack(">H", 0), _names, st.none())
_request = st.builds(
    lambda m, f, c, h, o, l: struct.pack(">IHHQQI", m, f, c, h, o, l),
    st.sampled_from([REQUEST_MAGIC, REQUEST_MAGIC, REQUEST_MAGIC, 0]),
    st.integers(0, 0xFFFF) | st.sampled_from([0, 1, 2, 4, 8, 16]),
    st.sampled_from([*Cmd, 8, 42]).filter(lambda c: c != Cmd.WRITE),
    st.integers(0, 2**64 - 1), st.integers(0, 2**21) | st.integers(0, 2**64 - 1),
    st.integers(0, 2**16) | st.integers(0, 2**32 - 1))
_write = st.builds(lambda o, d: struct.pack(">IHHQQI", REQUEST_MAGIC, 0, Cmd.WRITE, 1, o, len(d))
                   + d, st.integers(0, 2**20), st.binary(max_size=600))
_handshake_stream = st.lists(st.one_of(st.binary(max_size=40), _option, _go,
                                       st.just(scenarios.FIXED), st.just(scenarios.SR)),
                             max_size=12).map(b"".join)
_transmission_stream = st.lists(st.one_of(_request, _write, st.binary(max_size=40)),
                                max_size=12).map(b"".join)
_cuts = st.lists(st.integers(0, 2000), max_size=6)


def _pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)] or [b""]


async def _drive(conn, catalog, data: bytes, cuts: list[int]) -> None:
    for piece in _pieces(data, cuts):
        try:
            events = conn.receive_data(piece)
        except NbdProtocolError:
            assert conn.phase is Phase.CLOSED
            return
        assert isinstance(conn.data_to_send(), bytes)
        for event in events:
            assert isinstance(event, EVENT_TYPES)
            if isinstance(event, StartTls):
                conn.tls_established()
            elif isinstance(event, Request):
                export = conn.export
                assert event.command in Cmd.__members__.values()
                assert event.offset + event.length <= export.size
                reply = await execute(conn, export, event)
                assert isinstance(reply, (bytes, list))


_settings = settings(max_examples=300, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])


@_settings
@given(data=_handshake_stream, cuts=_cuts)
async def test_handshake_fuzz(data: bytes, cuts: list[int]) -> None:
    conn, catalog = connection()
    await _drive(conn, catalog, data, cuts)


@_settings
@given(data=_handshake_stream, cuts=_cuts)
async def test_tls_handshake_fuzz(data: bytes, cuts: list[int]) -> None:
    conn, catalog = connection(tls_available=True, tls_required=True)
    await _drive(conn, catalog, data, cuts)


@_settings
@given(data=_transmission_stream, cuts=_cuts, structured=st.booleans(),
       name=st.sampled_from([b"disk", b"ro"]))
async def test_transmission_fuzz(data: bytes, cuts: list[int], structured: bool,
                                 name: bytes) -> None:
    conn, catalog = negotiated(name, structured=structured,
                               contexts=[b"base:allocation", b"qemu:allocation-depth"])
    await _drive(conn, catalog, data, cuts)


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=300))
async def test_raw_bytes_fuzz(data: bytes) -> None:
    conn, catalog = connection()
    await _drive(conn, catalog, scenarios.FIXED + data, [])
