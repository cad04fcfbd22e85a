"""Replay what qemu-storage-daemon 7.2 answered (tests/data/nbd/qsd_wire.json).

The recording was made by record_qsd_nbd.py from the byte sequences of
scenarios.py. Our server must answer every step with the same bytes and
hang up where qsd hung up. Nothing is masked: sizes, flags, block sizes,
descriptions and error texts all match (the exports are set up alike).

Two ways in: the sans-IO core with the request executor (no sockets), and
the whole NbdServer over a unix socket.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from qmpd.nbd.events import Disconnect, Request, StartTls
from qmpd.nbd.protocol import NbdConnection
from qmpd.nbd.server import execute
from tests.nbd.conftest import scenario_catalog, start_server
from tests.nbd.decode import decode

RECORDING = json.loads((Path(__file__).parents[1] / "data" / "nbd" / "qsd_wire.json").read_text())
SCENARIOS = [(name, False) for name in RECORDING["scenarios"]] + [
    (name, True) for name in RECORDING["tls_scenarios"]]


def _steps(name: str, tls: bool) -> list[dict]:
    return RECORDING["tls_scenarios" if tls else "scenarios"][name]


def _compare(name: str, i: int, got: bytes, closed: bool, step: dict) -> None:
    want = bytes.fromhex(step["recv"])
    assert decode(got) == decode(want), f"{name} step {i}"
    assert got == want, f"{name} step {i}"
    assert closed == step["closed"], f"{name} step {i}: closed={closed}"


class SansIoDriver:
    """Runs a connection the way the server does, one request at a time."""

    def __init__(self, tls: bool) -> None:
        catalog = scenario_catalog()
        self.conn = NbdConnection(catalog.lookup, catalog.list_exports, tls_available=tls,
                                  tls_required=tls)
        self.closed = False
        self.export = None

    async def feed(self, data: bytes) -> bytes:
        out = []
        for event in self.conn.receive_data(data):
            out.append(self.conn.data_to_send())
            if isinstance(event, Request):
                reply = await execute(self.conn, self.conn.export, event)
                out.append(reply if isinstance(reply, bytes) else b"".join(reply))
            elif isinstance(event, Disconnect):
                self.closed = True
            elif isinstance(event, StartTls):
                pass  # the recording stops at the acknowledgement
        out.append(self.conn.data_to_send())
        return b"".join(out)


@pytest.mark.parametrize("name,tls", SCENARIOS, ids=[n for n, _ in SCENARIOS])
async def test_sans_io_matches_qsd(name: str, tls: bool) -> None:
    driver = SansIoDriver(tls)
    for i, step in enumerate(_steps(name, tls)):
        send = bytes.fromhex(step["send"])
        got = driver.conn.data_to_send() if i == 0 else await driver.feed(send)
        _compare(name, i, got, driver.closed, step)


async def _receive(stream, want: int, closed: bool) -> tuple[bytes, bool]:
    """``want`` bytes, then (briefly) anything extra and whether the server hung up."""
    got = bytearray()
    eof = False
    with trio.move_on_after(5):
        while len(got) < want:
            chunk = await stream.receive_some(1 << 20)
            if not chunk:
                eof = True
                break
            got += chunk
    if not eof:
        with trio.move_on_after(3 if closed else 0.02):
            while True:
                try:
                    chunk = await stream.receive_some(1 << 20)
                except trio.BrokenResourceError:
                    chunk = b""
                if not chunk:
                    eof = True
                    break
                got += chunk
    return bytes(got), eof


@pytest.mark.parametrize("now", [False, True], ids=["workers", "reads-now"])
@pytest.mark.parametrize("name", list(RECORDING["scenarios"]))
async def test_server_matches_qsd(name: str, now: bool, sockdir) -> None:
    """Both ways a READ is served: by a worker through the async calls, and
    at once from the reader (read_now/block_status_now, as cached nodes)."""
    path = sockdir / "nbd.sock"
    async with trio.open_nursery() as nursery:
        await start_server(nursery, scenario_catalog(now=now), path)
        stream = await trio.open_unix_socket(str(path))
        for i, step in enumerate(RECORDING["scenarios"][name]):
            if step["send"]:
                try:
                    await stream.send_all(bytes.fromhex(step["send"]))
                except trio.BrokenResourceError:
                    pass
            want = len(step["recv"]) // 2
            got, closed = await _receive(stream, want, step["closed"])
            _compare(name, i, got, closed, step)
        await stream.aclose()
        nursery.cancel_scope.cancel()


def test_recorded_handshake_timeout_is_qemus_default() -> None:
    from qmpd.nbd.server import DEFAULT_HANDSHAKE_TIMEOUT
    assert RECORDING["handshake_timeout_s"] == pytest.approx(DEFAULT_HANDSHAKE_TIMEOUT, abs=0.5)


@pytest.mark.interop
@pytest.mark.parametrize("name", ["info-exports", "meta-list-queries", "read-structured",
                                  "block-status", "unknown-commands"])
def test_recording_still_matches_installed_qsd(name: str) -> None:
    """The stored answers are what the installed qsd says today."""
    from tests.nbd import scenarios
    from tests.nbd.record_qsd_nbd import record_scenario
    from tests.oracles import require
    require("qemu-storage-daemon")
    assert record_scenario(scenarios.SCENARIOS[name]) == RECORDING["scenarios"][name]
