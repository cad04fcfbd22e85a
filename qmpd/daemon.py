"""The daemon: owns the registries (objects, nodes, jobs, sessions) and shutdown.

Ownership, from the top: :meth:`Daemon.serve` opens one nursery that holds
the job runner, the signal watcher and the listeners; each connection lives
in the listeners' nursery. Shutdown (a signal, ``quit``, or the caller)
tells every session, cancels that nursery — jobs first, through the job
runner's own shutdown — closes the block nodes (wiping volume keys) and
removes the socket files and the pid file.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio

from qmpd import QEMU_VERSION, __version__
from qmpd.block.graph import BlockGraph
from qmpd.commands import CommandContext, bind
from qmpd.crypto.errors import CryptoError
from qmpd.crypto.secrets import SecretStore
from qmpd.errors import QMPError, describe_bug
from qmpd.exports.listeners import inet_sockets
from qmpd.exports.registry import ExportRegistry
from qmpd.exports.tls import TlsCredsStore
from qmpd.jobs.manager import JobManager
from qmpd.listeners import (
    FdAddress,
    InetAddress,
    ListenerError,
    MonitorSpec,
    UnixAddress,
    abstract_unix_socket,
    describe,
    inherited_sockets,
    trio_listener,
)
from qmpd.qmp.pretty import encode_pretty
from qmpd.qmp.server import Connection, ServerError, event_message, open_unix_listener
from qmpd.qmp.session import Call, Session
from qmpd.qmp.wire import encode_message
from qmpd.schema import Schema

log = logging.getLogger("qmpd")


@dataclass
class Limits:
    """Resource limits per daemon; a client past them is refused or cut loose."""

    max_connections: int = 1024
    #: Replies and events waiting for a client that does not read.
    max_queued_bytes: int = 16 << 20
    #: An unfinished message may not buffer more than this.
    max_message_bytes: int = 64 << 20


class SecretsForBlock:
    """The secret lookup the block layer uses: QMP errors, copies to wipe."""

    def __init__(self, store: SecretStore) -> None:
        self._store = store

    def lookup(self, secret_id: str) -> bytearray:
        try:
            return self._store.lookup(secret_id)
        except CryptoError as exc:
            raise QMPError.generic(str(exc)) from None


class Daemon:
    """Everything one qmpd process serves."""

    def __init__(self, schema: Schema | None = None, *, limits: Limits | None = None) -> None:
        self.schema = schema or Schema.load()
        self.handlers = bind(set(self.schema.commands))
        self.limits = limits or Limits()
        self.secrets = SecretStore()
        #: Every user-created object by id, with its qom-type (ids are one namespace).
        self.objects: dict[str, str] = {}
        self.nodes = BlockGraph(SecretsForBlock(self.secrets))
        self.jobs = JobManager(self.emit_event)
        self.exports = ExportRegistry(self.nodes, self.emit_event, TlsCredsStore(self.objects))
        self.connections: set[Connection] = set()
        self._connection_count = 0
        self._shutdown = trio.Event()
        self._shutdown_reason = "host-signal"

    # -- protocol facts -------------------------------------------------------
    @staticmethod
    def version_info() -> dict:
        major, minor, micro = QEMU_VERSION
        return {
            "qemu": {"major": major, "minor": minor, "micro": micro},
            "package": f"qmpd {__version__}",
        }

    def greeting(self) -> dict:
        return {"QMP": {"version": self.version_info(), "capabilities": ["oob"]}}

    # -- commands and events ----------------------------------------------------
    def context(self, session: Session | None, command: str) -> CommandContext:
        """What a handler of ``command`` may touch."""
        return CommandContext(
            nodes=self.nodes,
            jobs=self.jobs,
            objects=self.objects,
            secrets=self.secrets,
            schema=self.schema,
            exports=self.exports,
            session=session,
            command=command,
            request_shutdown=self.request_shutdown,
            version_info=self.version_info,
        )

    async def execute(self, call: Call, session: Session | None, connection: Any = None) -> dict:
        """Run a checked request's handler and build its reply."""
        context = self.context(session, call.command)
        log.debug("executing %s", call.command)  # never the arguments: they may hold secrets
        try:
            result = await self.handlers[call.command](context, call.arguments)
        except QMPError as exc:
            return Session.error_reply(exc, call.id)
        except CryptoError as exc:
            return Session.error_reply(QMPError.generic(str(exc)), call.id)
        except Exception as exc:
            log.error("command %s failed unexpectedly: %s", call.command, describe_bug(exc))
            return Session.error_reply(
                QMPError.generic(f"Internal error while executing {call.command}"), call.id
            )
        return Session.reply(result, call)

    def emit_event(self, name: str, data: Any | None = None) -> None:
        """Send an event to every negotiated session; never blocks."""
        message = event_message(name, data)
        for connection in list(self.connections):
            connection.send_event(message)

    def request_shutdown(self, reason: str) -> None:
        self._shutdown_reason = reason
        self._shutdown.set()

    # -- serving ----------------------------------------------------------------
    async def serve(
        self,
        monitors: Iterable[str | os.PathLike | MonitorSpec],
        *,
        pidfile: str | None = None,
        startup: Callable[[], Awaitable[None]] | None = None,
        ready: Callable[[], None] | None = None,
        stopping: Callable[[], None] | None = None,
        task_status=trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until shutdown is requested; then clean up everything we made.

        ``monitors``: Unix socket paths (made mode 0600, a stale socket
        replaced) or :class:`~qmpd.listeners.MonitorSpec` (a path, host and
        port, inherited descriptors, or listeners the caller made).
        ``startup`` (the command line's objects, nodes, NBD server and
        exports) runs once the registries run and before any client is
        served. Then the pid file is written, every monitor accepts, and
        ``ready`` is called; ``stopping`` is called when shutdown begins.
        """
        specs = [
            m if isinstance(m, MonitorSpec) else MonitorSpec(UnixAddress(os.fspath(m)))
            for m in monitors
        ]
        shown_pidfile = pidfile
        if pidfile:
            pidfile = os.path.abspath(pidfile)  # --daemonize leaves the directory
        opened: list[tuple[MonitorSpec, list[trio.SocketListener]]] = []
        made_paths: list[str] = []
        wrote_pidfile = False
        failed: BaseException | None = None
        try:
            for spec in specs:
                opened.append((spec, await _open_monitor(spec, made_paths)))
            async with trio.open_nursery() as nursery:
                await nursery.start(self.jobs.run)
                await nursery.start(self.exports.run)
                if startup is not None:
                    try:
                        await startup()
                    except (QMPError, ValueError) as exc:  # bad options: not an error group
                        failed = exc
                        nursery.cancel_scope.cancel()
                if failed is None and pidfile:
                    try:
                        _write_pidfile(pidfile)
                        wrote_pidfile = True
                    except OSError as exc:
                        failed = ServerError(
                            f"cannot create PID file: Could not create '{shown_pidfile}': "
                            f"{os.strerror(exc.errno or 0)}"
                        )
                        nursery.cancel_scope.cancel()
                if failed is not None:
                    return
                nursery.start_soon(self._watch_signals)
                for spec, listeners in opened:
                    await nursery.start(
                        trio.serve_listeners,
                        partial(self._serve_client, pretty=spec.pretty),
                        listeners,
                    )
                task_status.started()
                if ready is not None:
                    ready()
                await self._shutdown.wait()
                log.info("shutting down (%s)", self._shutdown_reason)
                if stopping is not None:
                    stopping()
                self.emit_event("SHUTDOWN", {"guest": False, "reason": self._shutdown_reason})
                await self._flush_connections()
                await self.jobs.shutdown()
                await self.exports.close()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self.close()
            for _spec, listeners in opened:
                for listener in listeners:
                    listener.socket.close()
            for path in made_paths:
                _unlink_quietly(path)
            if pidfile and wrote_pidfile:
                _unlink_quietly(pidfile)
            if failed is not None:
                raise failed

    async def close(self) -> None:
        """Stop exporting, close every node (wiping volume keys), wipe every secret."""
        await self.exports.close()
        await self.nodes.close_all()
        self.secrets.clear()

    async def _serve_client(self, stream: trio.SocketStream, *, pretty: bool = False) -> None:
        self._connection_count += 1
        if len(self.connections) >= self.limits.max_connections:
            log.warning("refusing a client: %d sessions already", len(self.connections))
            # Say why instead of a bare hang-up; a short write to a fresh
            # socket fits its buffer, and a client that is gone costs nothing.
            refusal = Session.error_reply(
                QMPError.generic(
                    f"Too many QMP connections (at most {self.limits.max_connections})"
                )
            )
            with trio.move_on_after(1):
                try:
                    await stream.send_all((encode_pretty if pretty else encode_message)(refusal))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            await trio.aclose_forcefully(stream)
            return
        try:
            await Connection(self, stream, self._connection_count, pretty=pretty).run()
        except Exception as exc:  # one client's trouble must never end the daemon
            log.error(
                "session %d ended with an error: %s", self._connection_count, describe_bug(exc)
            )

    async def _flush_connections(self, timeout: float = 1.0) -> None:
        with trio.move_on_after(timeout):
            while any(c.has_pending_output() for c in self.connections):
                await trio.sleep(0.01)

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for _ in signals:
                self.request_shutdown("host-signal")


async def _open_monitor(spec: MonitorSpec, made_paths: list[str]) -> list[trio.SocketListener]:
    """The listening sockets of one monitor; ServerError with the user's text."""
    where = spec.address
    if isinstance(where, trio.SocketListener):
        return [where]
    if isinstance(where, list):
        return list(where)
    try:
        if isinstance(where, UnixAddress) and where.abstract:
            sock = abstract_unix_socket(where)
            log.info("QMP monitor on %s", describe(sock))
            return [trio_listener(sock)]
        if isinstance(where, UnixAddress):
            path = os.path.abspath(where.path)
            listener = open_unix_listener(path)
            made_paths.append(path)
            log.info("QMP monitor on %s", path)
            return [listener]
        if isinstance(where, InetAddress):
            socks = await inet_sockets(where.socket_address())
            shown = ", ".join(describe(sock) for sock in socks)
            log.warning(
                "QMP over TCP on %s: the monitor has no authentication and no "
                "encryption; anyone who can connect controls qmpd (its images, keys "
                "and exports)",
                shown,
            )
            return [trio_listener(sock) for sock in socks]
        if isinstance(where, FdAddress):
            socks = inherited_sockets(where.text)
            log.info("QMP monitor on inherited %s", ", ".join(describe(s) for s in socks))
            return [trio_listener(sock) for sock in socks]
    except (ListenerError, ServerError, QMPError) as exc:
        text = exc.desc if isinstance(exc, QMPError) else str(exc)
        raise ServerError(f"{spec.origin}: {text}" if spec.origin else text) from None
    raise TypeError(f"not a monitor address: {where!r}")


def _write_pidfile(path: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, path)
    except OSError:
        _unlink_quietly(tmp)
        raise


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
