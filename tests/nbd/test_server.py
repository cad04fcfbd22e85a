"""The trio edge: concurrency, limits, timeouts, hostile clients, accounting."""

from __future__ import annotations

import errno
import logging
import socket
import struct

import pytest
import trio

from qmpd.nbd.constants import OPTION_REPLY_MAGIC, Cmd, Opt, Rep
from qmpd.nbd.server import NbdServer, fd_listener, tcp_listeners, unix_listener
from tests.nbd import scenarios
from tests.nbd.conftest import scenario_catalog, start_server
from tests.nbd.memory import Catalog, MemoryExport
from tests.nbd.wire import request


async def read_exactly(stream, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = await stream.receive_some(n - len(out))
        if not chunk:
            raise EOFError(f"EOF after {len(out)} of {n} bytes")
        out += chunk
    return bytes(out)


async def negotiate(stream, name: bytes = b"disk", structured: bool = False) -> None:
    """Greeting, options, GO: returns in transmission."""
    assert (await read_exactly(stream, 18)).startswith(b"NBDMAGIC")
    await stream.send_all(scenarios.FIXED + (scenarios.SR if structured else b"")
                          + scenarios.go(name))
    while True:
        magic, opt, rep, length = struct.unpack(">QIII", await read_exactly(stream, 20))
        assert magic == OPTION_REPLY_MAGIC
        await read_exactly(stream, length)
        if opt == Opt.GO:
            assert rep in (Rep.ACK, Rep.INFO), hex(rep)
            if rep == Rep.ACK:
                return


async def connect(path, name=b"disk", structured=False):
    stream = await trio.open_unix_socket(str(path))
    await negotiate(stream, name, structured)
    return stream


async def simple_read(stream, offset: int, length: int, cookie: int = 1) -> bytes:
    await stream.send_all(request(Cmd.READ, offset, length, cookie=cookie))
    _magic, err, got = struct.unpack(">IIQ", await read_exactly(stream, 16))
    assert (err, got) == (0, cookie)
    return await read_exactly(stream, length)


async def wait_for(predicate, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


async def test_serves_while_1000_connections_idle(sockdir) -> None:
    path = sockdir / "s"
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, scenario_catalog(), path, max_connections=0)
        idle = [await trio.open_unix_socket(str(path)) for _ in range(1000)]
        await wait_for(lambda: server.connections == 1000)
        good = await connect(path)
        assert await simple_read(good, 0, 16) == scenarios.image()[:16]
        for s in idle:
            await s.aclose()
        await good.aclose()
        await wait_for(lambda: server.connections == 0)
        nursery.cancel_scope.cancel()


async def test_client_that_never_reads_blocks_only_itself(sockdir) -> None:
    path = sockdir / "s"
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, scenario_catalog(), path)
        hog = await connect(path)
        flood = b"".join(request(Cmd.READ, 0, 1 << 20, cookie=i) for i in range(100))
        with trio.move_on_after(1):
            await hog.send_all(flood)  # stalls: the server stopped reading from it
        (client,) = server._all
        assert client._in_flight <= 16 and client._outbox_replies <= 16
        good = await connect(path)
        for i in range(50):
            assert len(await simple_read(good, i * 4096, 4096, cookie=i)) == 4096
        await hog.aclose()
        await good.aclose()
        await wait_for(lambda: server.connections == 0)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("garbage", [b"", b"\0\0", scenarios.FIXED, scenarios.FIXED + b"IHAVE",
                                     scenarios.FIXED + scenarios.go(b"disk")[:-3]])
async def test_truncated_handshakes_do_not_hurt(sockdir, garbage: bytes) -> None:
    path = sockdir / "s"
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, scenario_catalog(), path)
        for _ in range(20):
            s = await trio.open_unix_socket(str(path))
            await s.send_all(garbage)
            await s.aclose()
        good = await connect(path)
        assert len(await simple_read(good, 0, 512)) == 512
        await good.aclose()
        await wait_for(lambda: server.connections == 0)
        nursery.cancel_scope.cancel()


async def test_handshake_timeout(sockdir) -> None:
    path = sockdir / "s"
    async with trio.open_nursery() as nursery:
        await start_server(nursery, scenario_catalog(), path, handshake_timeout=0.3)
        lazy = await trio.open_unix_socket(str(path))
        start = trio.current_time()
        await read_exactly(lazy, 18)
        with trio.fail_after(3):
            assert await lazy.receive_some(100) == b""
        assert trio.current_time() - start >= 0.29
        good = await connect(path)
        await trio.sleep(0.6)  # past the timeout, but negotiated: still served
        assert len(await simple_read(good, 0, 8)) == 8
        await good.aclose()
        nursery.cancel_scope.cancel()


async def test_max_connections_stops_accepting(sockdir) -> None:
    path = sockdir / "s"
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, scenario_catalog(), path, max_connections=2)
        a = await connect(path)
        b = await connect(path)
        c = await trio.open_unix_socket(str(path))  # waits in the backlog, like QEMU
        with trio.move_on_after(0.3) as waited:
            await c.receive_some(18)
        assert waited.cancelled_caught and server.connections == 2
        await a.aclose()
        await negotiate(c)
        assert len(await simple_read(c, 0, 8)) == 8
        await b.aclose()
        await c.aclose()
        nursery.cancel_scope.cancel()


async def test_single_connection_server_does_not_offer_multi_conn(sockdir) -> None:
    from qmpd.nbd.protocol import NbdConnection
    conn = NbdConnection(lambda n: None, list, multi_conn=False)
    assert conn._negotiation.multi_conn is False
    server = NbdServer(lambda n: None, list, max_connections=1)
    from qmpd.nbd.server import _Client
    client = _Client(server, None)
    assert client.conn._negotiation.multi_conn is False


async def test_export_accounting_and_hard_close(sockdir) -> None:
    path = sockdir / "s"
    unused = []
    catalog = scenario_catalog()
    disk = catalog.exports["disk"]
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, catalog, path, on_export_unused=unused.append)
        a = await connect(path)
        b = await connect(path)
        r = await connect(path, b"ro")
        await wait_for(lambda: server.clients(disk) == 2)
        await a.aclose()
        await wait_for(lambda: server.clients(disk) == 1)
        assert unused == []
        server.close_clients(disk)  # block-export-del mode=hard
        with trio.fail_after(3):
            assert await b.receive_some(10) == b""
        await wait_for(lambda: unused == [disk])
        assert server.clients(catalog.exports["ro"]) == 1
        assert len(await simple_read(r, 0, 8)) == 8
        server.stop()  # nbd-server-stop
        with trio.fail_after(3):
            assert await r.receive_some(10) == b""
    with pytest.raises(OSError):
        await trio.open_unix_socket(str(path))


class Buggy(MemoryExport):
    async def flush(self):
        raise RuntimeError("secret passphrase hunter2")


async def test_backend_bug_closes_only_that_connection(sockdir, caplog) -> None:
    path = sockdir / "s"
    catalog = Catalog(Buggy("disk", 1 << 20))
    caplog.set_level(logging.INFO, logger="qmpd.nbd.server")
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, catalog, path)
        victim = await connect(path)
        await victim.send_all(request(Cmd.FLUSH))
        with trio.fail_after(3):
            assert await victim.receive_some(10) == b""
        other = await connect(path)
        assert await simple_read(other, 0, 4) == bytes(4)
        await other.aclose()
        await wait_for(lambda: server.connections == 0)
        nursery.cancel_scope.cancel()
    assert "RuntimeError" in caplog.text and "hunter2" not in caplog.text


async def test_oversized_write_closes_after_the_error(sockdir) -> None:
    path = sockdir / "s"
    async with trio.open_nursery() as nursery:
        await start_server(nursery, scenario_catalog(), path)
        s = await connect(path)
        await s.send_all(request(Cmd.WRITE, 0, 64 << 20, cookie=5))
        reply = await read_exactly(s, 16)
        assert struct.unpack(">IIQ", reply)[1:] == (22, 5)
        with trio.fail_after(3):
            assert await s.receive_some(10) == b""
        nursery.cancel_scope.cancel()


async def test_tcp_and_inherited_fd_listeners() -> None:
    catalog = scenario_catalog()
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.bind(("127.0.0.1", 0))
    raw.listen()
    fd_port = raw.getsockname()[1]
    async with trio.open_nursery() as nursery:
        tcp = await tcp_listeners("127.0.0.1", 0)
        tcp_port = tcp[0].socket.getsockname()[1]
        server = NbdServer(catalog.lookup, catalog.list_exports)
        await nursery.start(server.serve, tcp + [fd_listener(raw.detach())])
        for port in (tcp_port, fd_port):
            s = await trio.open_tcp_stream("127.0.0.1", port)
            await negotiate(s, b"ro")
            assert await simple_read(s, 0, 16) == scenarios.image()[:16]
            await s.aclose()
        nursery.cancel_scope.cancel()


async def test_unix_listener_replaces_a_stale_socket(sockdir) -> None:
    path = sockdir / "s"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    listener = unix_listener(str(path))
    await listener.aclose()


async def test_out_of_order_replies_and_in_flight_limit(sockdir) -> None:
    class Gate(MemoryExport):
        """Reads wait until the test opens the gate; counts how many wait at once."""
        waiting = 0
        peak = 0
        gate = trio.Event()

        async def read(self, offset, length):
            Gate.waiting += 1
            Gate.peak = max(Gate.peak, Gate.waiting)
            if offset == 0:
                await Gate.gate.wait()
            Gate.waiting -= 1
            return await super().read(offset, length)

    path = sockdir / "s"
    async with trio.open_nursery() as nursery:
        await start_server(nursery, Catalog(Gate("disk", 1 << 20)), path)
        s = await connect(path)
        await s.send_all(b"".join(request(Cmd.READ, i * 4096 if i else 0, 4096, cookie=i)
                                  for i in range(40)))
        seen = []
        for _ in range(39):  # everything but the blocked read overtakes it
            _, _err, cookie = struct.unpack(">IIQ", await read_exactly(s, 16))
            await read_exactly(s, 4096)
            seen.append(cookie)
        assert 0 not in seen
        Gate.gate.set()
        _, _err, cookie = struct.unpack(">IIQ", await read_exactly(s, 16))
        await read_exactly(s, 4096)
        seen.append(cookie)
        assert sorted(seen) == list(range(40)) and Gate.peak <= 16
        await s.aclose()
        nursery.cancel_scope.cancel()


class Uncached(MemoryExport):
    """Serves reads at once except those touching the first 4 KiB (not "cached")."""

    def read_now(self, ranges):
        if any(offset < 4096 for offset, _ in ranges):
            self.calls.append(("refused", len(ranges)))
            return None
        return super().read_now(ranges)


@pytest.mark.parametrize("structured", [False, True])
async def test_reads_now_and_the_fallback_to_workers(sockdir, structured) -> None:
    """A burst of READs is served at once in one read_now() call; when the
    export cannot (one range not cached), each read is tried alone and only
    the one that must wait goes to a worker (read()); an error from read_now
    sends the reads to the workers too. Every reply is right either way."""
    image = bytes(range(256)) * 4096
    export = Uncached.from_image("disk", image, len(image), now=True)
    path = sockdir / "s"
    async with trio.open_nursery() as nursery:
        await start_server(nursery, Catalog(export), path)
        s = await connect(path, structured=structured)
        async def reply() -> tuple[int, bytes]:
            if structured:   # one OFFSET_DATA chunk: the export has no holes
                _m, _flags, _type, cookie, length = struct.unpack(
                    ">IHHQI", await read_exactly(s, 20))
                return cookie, (await read_exactly(s, length))[8:]
            _m, err, cookie = struct.unpack(">IIQ", await read_exactly(s, 16))
            assert err == 0
            return cookie, await read_exactly(s, 4096)

        offsets = [8192, 0, 16384, 12288]
        await s.send_all(b"".join(request(Cmd.READ, off, 4096, cookie=i + 1)
                                  for i, off in enumerate(offsets)))
        got = dict([await reply() for _ in offsets])
        assert got == {i + 1: image[off:off + 4096] for i, off in enumerate(offsets)}
        assert ("refused", 4) in export.calls                  # the burst, refused whole
        assert export.calls.count("read") == 1                  # only offset 0 by a worker
        export.calls.clear()
        export.fail["read_now"] = errno.EIO                     # an error from the fast path
        await s.send_all(request(Cmd.READ, 8192, 4096, cookie=9))
        assert await reply() == (9, image[8192:12288])
        assert [c for c in export.calls if "read" in c] == ["read_now", "read"]   # then a worker
        await s.aclose()
        nursery.cancel_scope.cancel()
