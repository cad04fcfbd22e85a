"""Run an NbdServer in a thread of its own, for tests that call blocking tools.

    with ServedCatalog(catalog, unix=path, tcp=True) as served:
        subprocess.run(["nbdinfo", served.uri("disk")])
"""

from __future__ import annotations

import threading
from typing import Self

import trio

from qmpd.nbd.server import NbdServer, tcp_listeners, unix_listener


class ServedCatalog:
    def __init__(self, catalog, *, unix: str | None = None, tcp: bool = False, **server_kw):
        self.catalog = catalog
        self.unix = unix
        self.tcp = tcp
        self.port: int | None = None
        self.server_kw = server_kw
        self.server: NbdServer | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)
        self.error: BaseException | None = None

    def uri(self, name: str, scheme: str = "nbd") -> str:
        if self.unix:
            return f"{scheme}+unix:///{name}?socket={self.unix}"
        return f"{scheme}://127.0.0.1:{self.port}/{name}"

    def _main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as e:  # noqa: BLE001 - surfaced by __exit__
            self.error = e
            self._ready.set()

    async def _serve(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        listeners = []
        if self.unix:
            listeners.append(unix_listener(self.unix))
        if self.tcp:
            tcp = await tcp_listeners("127.0.0.1", 0)
            self.port = tcp[0].socket.getsockname()[1]
            listeners += tcp
        self.server = NbdServer(self.catalog.lookup, self.catalog.list_exports, **self.server_kw)
        async with trio.open_nursery() as nursery:
            await nursery.start(self.server.serve, listeners)
            self._ready.set()

    def call(self, fn, *args):
        """Run ``fn(*args)`` in the server's thread (e.g. server.close_clients)."""
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def __enter__(self) -> Self:
        self._thread.start()
        self._ready.wait(10)
        if self.error:
            raise self.error
        return self

    def __exit__(self, *exc) -> None:
        if self._token is not None and self.server is not None:
            try:
                self.call(self.server.stop)
            except trio.RunFinishedError:
                pass
        self._thread.join(10)
        if self.error and not exc[0]:
            raise self.error
