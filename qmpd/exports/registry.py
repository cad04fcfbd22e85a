"""The block exports and the NBD server they are served by (QEMU's block/export/).

Theory of operation
-------------------
An export is added under the graph lock as a parent of its node (its
permissions checked like any parent's) and registered by id and by NBD
name. Removing one is two steps, as in QEMU: a *shutdown request* marks it
``shutting-down`` (new clients no longer see it) and, in hard mode, hangs
up on its clients; the export is *finished* once its last client is gone
— it lets go of its node and BLOCK_EXPORT_DELETED is emitted. With no
client connected both steps happen before the command returns, so the
event comes before the reply (as qsd's does); otherwise it follows later.

The NBD server (qmpd.nbd.server) runs in this registry's nursery, started
by nbd-server-start or --nbd-server and stopped by nbd-server-stop (which
first removes every NBD export, waiting for their clients to go) or at
shutdown. Checks and texts follow QEMU 7.2's blk_exp_add,
nbd_export_create, qmp_nbd_server_add and nbd_server_start, in their order.
"""

from __future__ import annotations

import logging
import os
import ssl
import stat
from typing import Any, Callable

import trio

from qmpd.block.graph import BlockGraph
from qmpd.block.node import in_thread
from qmpd.errors import QMPError
from qmpd.exports.listeners import describe, open_listeners, unix_path_of
from qmpd.exports.nbd_export import NbdBlockExport
from qmpd.nbd.server import NbdServer

log = logging.getLogger(__name__)

#: QEMU's NBD_MAX_STRING_SIZE: the longest export name or description.
NBD_MAX_STRING_SIZE = 4096
DEFAULT_MAX_CONNECTIONS = 100

EmitEvent = Callable[[str, Any], None]
TlsLookup = Callable[[str], ssl.SSLContext]


def id_wellformed(text: str) -> bool:
    """QEMU's id_wellformed: a letter, then letters, digits, '-', '.', '_'."""
    return (
        bool(text)
        and text[0].isascii()
        and text[0].isalpha()
        and all(c.isascii() and (c.isalnum() or c in "-._") for c in text)
    )


class ExportRegistry:
    """Every block export of the daemon, by id, in creation order."""

    def __init__(
        self, graph: BlockGraph, emit_event: EmitEvent, tls_lookup: TlsLookup | None = None
    ) -> None:
        self.graph = graph
        self.emit_event = emit_event
        self.tls_lookup = tls_lookup
        self.exports: dict[str, NbdBlockExport] = {}
        self._finished: dict[str, trio.Event] = {}
        self._server: NbdServer | None = None
        self._server_scope: trio.CancelScope | None = None
        self._unix_paths: list[str] = []
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Own the NBD server's tasks until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    # -- the NBD server ----------------------------------------------------------
    @property
    def server_running(self) -> bool:
        return self._server is not None

    async def start_server(
        self,
        addr: dict,
        *,
        tls_creds: str | None = None,
        tls_authz: str | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        monitor: bool = False,
    ) -> None:
        """nbd-server-start (``monitor``) / --nbd-server with a flat SocketAddress."""
        if self._server is not None:
            raise QMPError.generic("NBD server already running")
        assert self._nursery is not None, "the registry is not running"
        listeners = await open_listeners(addr, monitor=monitor)
        try:
            tls = None
            if tls_creds is not None:
                if self.tls_lookup is None:
                    raise QMPError.generic(f"No TLS credentials with id '{tls_creds}'")
                tls = self.tls_lookup(tls_creds)  # any address type, as qsd 7.2
            elif addr["type"] == "inet":
                log.warning(
                    "NBD server on TCP without TLS: decrypted disks are readable "
                    "by anyone who can reach %s",
                    describe(addr),
                )
        except BaseException:
            for listener in listeners:
                await listener.aclose()
            raise
        path = unix_path_of(addr)
        self._unix_paths = [path] if path else []
        server = NbdServer(
            self._lookup,
            self._list,
            max_connections=max_connections,
            tls=tls,
            on_export_unused=self._unused,
        )
        self._server = server
        self._tls_authz = tls_authz
        await self._nursery.start(server.serve, listeners)

    async def stop_server(self) -> None:
        """nbd-server-stop: remove every NBD export (their clients hung up on), then stop."""
        server = self._server
        if server is None:
            raise QMPError.generic("NBD server not running")
        # QEMU shuts every export down newest first; those without clients are
        # deleted by bottom halves that run oldest first, those with clients as
        # their clients go (newest first, as they were hung up on).
        exports = list(self.exports.values())
        for export in exports:
            export.shutting_down = True
        idle = [e for e in exports if not server.clients(e)]
        busy = [e for e in reversed(exports) if server.clients(e)]
        for export in idle:
            await self._finish(export)
        for export in busy:
            server.close_clients(export)
            await self._finish_when_unused(export)
        server.stop()
        self._server = None
        for path in self._unix_paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self._unix_paths = []

    # -- exports -----------------------------------------------------------------
    async def add(self, options: dict) -> NbdBlockExport:
        """block-export-add type=nbd."""
        export_id = options["id"]
        if not id_wellformed(export_id):
            raise QMPError.generic("Invalid block export id")
        if export_id in self.exports:
            raise QMPError.generic(f"Block export id '{export_id}' is already in use")
        async with self.graph.lock:
            node = self.graph.lookup_bs(options["node-name"])
            iothread = options.get("iothread")
            if iothread is not None:
                raise QMPError.generic(f'iothread "{iothread}" not found')
            writable = bool(options.get("writable", False))
            if writable and node.read_only:
                raise QMPError.generic("Cannot export read-only node as writable")
            if options["type"] != "nbd":
                await refuse_export_type(options)
            name = options.get("name", options["node-name"])
            export = NbdBlockExport(
                export_id,
                node,
                name=name,
                description=options.get("description"),
                writable=writable,
                writethrough=bool(options.get("writethrough", False)),
                allocation_depth=bool(options.get("allocation-depth", False)),
            )
            await self.graph.attach(export, node)
            try:
                self._check_nbd(options, name)
                for bitmap in options.get("bitmaps") or ():  # qmpd nodes have no bitmaps
                    if isinstance(bitmap, dict):  # block_dirty_bitmap_lookup's texts
                        self.graph.lookup_bs(bitmap["node"], device=bitmap["node"])
                        raise QMPError.generic(f"Dirty bitmap '{bitmap['name']}' not found")
                    raise QMPError.generic(f"Bitmap '{bitmap}' is not found")
                export.size = await in_thread(node.length)
                export.share_resize = False
                await self.graph.refresh(node)
            except BaseException:
                await self.graph.detach(export, node)
                raise
        self.exports[export_id] = export
        self._finished[export_id] = trio.Event()
        return export

    def _check_nbd(self, options: dict, name: str) -> None:
        """nbd_export_create's checks, in its order."""
        if self._server is None:
            raise QMPError.generic("NBD server not running")
        if len(name.encode()) > NBD_MAX_STRING_SIZE:
            raise QMPError.generic(f"export name '{name}' too long")
        description = options.get("description")
        if description is not None and len(description.encode()) > NBD_MAX_STRING_SIZE:
            raise QMPError.generic(f"description '{description}' too long")
        if self._lookup_any(name) is not None:
            raise QMPError.generic(f"NBD server already has export named '{name}'")

    async def add_legacy(self, options: dict) -> None:
        """nbd-server-add (qmp_nbd_server_add): an NBD export whose id is its name.

        The device is looked up first; the rest is block-export-add's, so a
        duplicate id is reported before a duplicate name. A read-only node
        asked to be writable is quietly exported read-only, as QEMU does.
        """
        device = options["device"]
        async with self.graph.lock:
            node = self.graph.lookup_bs(device, device=device)
        name = options.get("name", device)
        args = {
            "type": "nbd",
            "id": name,
            "node-name": node.name,
            "name": name,
            "writable": bool(options.get("writable", False)) and not node.read_only,
        }
        if "description" in options:
            args["description"] = options["description"]
        if "bitmap" in options:
            args["bitmaps"] = [options["bitmap"]]
        await self.add(args)

    async def delete(self, export_id: str, mode: str = "safe") -> None:
        """block-export-del / nbd-server-remove."""
        export = self.exports.get(export_id)
        if export is None:
            raise QMPError.generic(f"Export '{export_id}' is not found")
        if export.shutting_down:
            raise QMPError.generic(f"Export '{export_id}' is already shutting down")
        clients = self._server.clients(export) if self._server is not None else 0
        if mode == "safe" and clients:
            raise QMPError.generic(f"export '{export_id}' still in use")
        export.shutting_down = True
        if clients:
            assert self._server is not None
            self._server.close_clients(export)  # finished by _unused, later
            return
        await self._finish(export)

    def query(self) -> list[dict]:
        """query-block-exports: newest first, as QEMU lists them."""
        return [export.info() for export in reversed(self.exports.values())]

    async def close(self) -> None:
        """Shutdown: every export finished, the server stopped."""
        with trio.CancelScope(shield=True):
            if self._server is not None:
                with trio.move_on_after(5):
                    await self.stop_server()
            for export in list(self.exports.values()):
                await self._finish(export)

    # -- finishing -------------------------------------------------------------------
    async def _finish_when_unused(self, export: NbdBlockExport) -> None:
        finished = self._finished[export.id]
        if self._server is not None and self._server.clients(export):
            await finished.wait()
        else:
            await self._finish(export)

    def _unused(self, export: Any) -> None:
        """The NBD server's call when the last client of ``export`` left."""
        if export.shutting_down and export.id in self.exports and self._nursery is not None:
            self._nursery.start_soon(self._finish, export)

    async def _finish(self, export: NbdBlockExport) -> None:
        if self.exports.get(export.id) is not export:
            return
        del self.exports[export.id]
        with trio.CancelScope(shield=True):
            async with self.graph.lock:
                await self.graph.detach(export, export.node)
        self.emit_event("BLOCK_EXPORT_DELETED", {"id": export.id})
        self._finished[export.id].set()

    # -- what the NBD server asks ---------------------------------------------------------
    def _lookup_any(self, name: str) -> NbdBlockExport | None:
        for export in self.exports.values():
            if export.name == name:
                return export
        return None

    def _lookup(self, name: str) -> NbdBlockExport | None:
        export = self._lookup_any(name)
        return None if export is None or export.shutting_down else export

    def _list(self) -> list[NbdBlockExport]:
        return [e for e in self.exports.values() if not e.shutting_down]


async def refuse_export_type(options: dict) -> None:
    """Export types qsd 7.2 offers and qmpd does not (FUSE says why its mountpoint is bad first)."""
    kind = options["type"]
    if kind == "fuse":
        mountpoint = options["mountpoint"]
        try:
            st = await trio.to_thread.run_sync(os.stat, mountpoint)
        except OSError as err:
            raise QMPError.generic(
                f"Failed to stat '{mountpoint}': {os.strerror(err.errno or 0)}"
            ) from None
        if not stat.S_ISREG(st.st_mode):
            raise QMPError.generic(f"'{mountpoint}' is not a regular file")
    raise QMPError.generic(f"qmpd does not offer {kind} exports (only nbd)")
