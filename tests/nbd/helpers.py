"""Sans-IO helpers: a connection over the scenario catalog, handshakes as bytes."""

from __future__ import annotations

from qmpd.nbd.constants import Opt
from qmpd.nbd.events import Disconnect, Request
from qmpd.nbd.protocol import NbdConnection
from qmpd.nbd.server import execute
from tests.nbd import scenarios
from tests.nbd.conftest import scenario_catalog
from tests.nbd.wire import meta_payload, option


def connection(**kw) -> tuple[NbdConnection, object]:
    catalog = scenario_catalog()
    conn = NbdConnection(catalog.lookup, catalog.list_exports, **kw)
    conn.data_to_send()  # the greeting
    return conn, catalog


def handshake(name: bytes = b"disk", structured: bool = True, contexts: list[bytes] | None = None
              ) -> bytes:
    steps = [scenarios.FIXED]
    if structured:
        steps.append(scenarios.SR)
        if contexts:
            steps.append(option(Opt.SET_META_CONTEXT, meta_payload(name, contexts)))
    steps.append(scenarios.go(name))
    return b"".join(steps)


def negotiated(name: bytes = b"disk", structured: bool = True, contexts=None, **kw):
    conn, catalog = connection(**kw)
    events = conn.receive_data(handshake(name, structured, contexts))
    conn.data_to_send()
    assert events and type(events[-1]).__name__ == "Negotiated", events
    return conn, catalog


async def run(conn: NbdConnection, data: bytes) -> tuple[bytes, bool]:
    """Feed ``data``, execute requests in order; (all bytes out, hung up?)."""
    out, closed = [], False
    for event in conn.receive_data(data):
        out.append(conn.data_to_send())
        if isinstance(event, Request):
            reply = await execute(conn, conn.export, event)
            out.append(reply if isinstance(reply, bytes) else b"".join(reply))
        elif isinstance(event, Disconnect):
            closed = True
    out.append(conn.data_to_send())
    return b"".join(out), closed
