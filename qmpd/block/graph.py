"""The node graph: blockdev-add/del/reopen/create/amend and the node query.

Nodes are ``file`` (an image file and its locks), ``luks`` (raw LUKS on a
file child) and ``qcow2`` (optionally with LUKS inside, found through the
FDE header extension). A format node's ``file`` child is given inline (an
options dict, opened as an implicit ``#blockNNN`` node that lives and dies
with its parent) or by reference to an existing node-name.

Permissions follow QEMU 7.2 (see permissions.py): each parent takes a
(perm, shared) pair on its file child; the child checks the pairs of all
its parents against each other, newest parent first, then moves its OFD
lock bytes. A key update adds WRITE and refuses to share CONSISTENT_READ
and WRITE on the file for exactly as long as the keys are being written.

Concurrency: graph changes run on the trio thread under one trio lock;
every file access (open, lock bytes, reads, writes, PBKDF2) runs in a
worker thread. Command handlers are expected to translate errors only by
passing QMPError on; CryptoError texts are QEMU's and become GenericError.
"""

from __future__ import annotations

import errno
import json
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, TypeVar

import trio

from qmpd.block.drivers import qcow2_metadata as qcow2
from qmpd.block.drivers.file import FileNode, FileOptions, FileRegionIO, open_error
from qmpd.block.locks import ImageLock
from qmpd.block.permissions import (
    ALL, NONE, Perm, PermissionUse, check_conflicts, cumulative, format_child_perms)
from qmpd.crypto.errors import CryptoError
from qmpd.crypto.luks import (
    DEFAULT_ITER_TIME, LuksAmendOptions, LuksCreateOptions, apply_amend, create_volume,
    header_length, open_volume, prepare_amend)
from qmpd.crypto.secrets import wipe as _wipe
from qmpd.errors import QMPError

T = TypeVar("T")

_NODE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")
NODE_NAME_MAX = 31


class SecretLookup(Protocol):
    def lookup(self, secret_id: str) -> bytearray:
        """A copy of the secret's bytes (the caller wipes it), or QMPError."""


class Progress(Protocol):
    def set(self, current: int, total: int) -> None: ...


async def _abandonable(fn: Callable[[], T], discard: Callable[[T | None], None]) -> T:
    """Work that writes nothing, in a thread a cancel abandons at once.

    When the work ends after we stopped waiting, ``discard`` gets its result
    (None if it failed) to wipe what it holds: a late volume key, secrets
    looked up meanwhile. Nothing secret is just dropped.
    """
    lock = threading.Lock()
    state: dict[str, Any] = {}

    def work() -> T:
        result = None
        try:
            result = fn()
            return result
        finally:
            with lock:
                if state.get("abandoned"):
                    discard(result)
                else:
                    state["result"] = result

    try:
        return await _in_thread(work, abandon_on_cancel=True)
    except trio.Cancelled:
        with lock:
            state["abandoned"] = True
            late = state.pop("result", None)
        if late is not None:
            discard(late)
        raise


def _wipe_all(buffers: list[bytearray]) -> None:
    for buf in buffers:
        _wipe(buf)


async def _in_thread(fn: Callable[..., T], *args: Any, abandon_on_cancel: bool = False) -> T:
    """Run blocking work in a worker thread; CryptoError becomes QMPError.

    ``abandon_on_cancel``: on cancellation return at once and let the thread
    finish unobserved; only for work that writes nothing (its result is
    dropped), such as PBKDF2 over a hostile header's iteration count.
    """
    def call() -> T:
        try:
            return fn(*args)
        except CryptoError as err:
            raise QMPError.generic(str(err)) from None
        except OSError as err:
            raise QMPError.generic(os.strerror(err.errno or errno.EIO)) from None
    return await trio.to_thread.run_sync(call, abandon_on_cancel=abandon_on_cancel)


def node_name_error(name: str) -> QMPError | None:
    """QEMU's bdrv_assign_node_name checks (id_wellformed, length)."""
    if not _NODE_NAME.match(name):
        return QMPError.generic(f"Invalid node-name: '{name}'")
    if len(name) > NODE_NAME_MAX:
        return QMPError.generic("Node name too long")
    return None


# -- nodes -----------------------------------------------------------------------

@dataclass(eq=False)
class Node:
    name: str
    driver: str
    implicit: bool
    read_only: bool
    options: dict
    file: "Node | None" = None
    parents: list["Node"] = field(default_factory=list)   # newest first
    busy: str | None = None                                # e.g. an amend in progress
    job_refs: int = 0                                      # jobs that hold the node until dismissed

    # Format nodes override these.
    def child_perms(self) -> tuple[Perm, Perm]:
        return NONE, ALL

    def close(self) -> None:
        pass


@dataclass(eq=False)
class FileBlockNode(Node):
    handle: FileNode | None = None

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


@dataclass(eq=False)
class FormatNode(Node):
    volume: Any = None                 # LuksVolume while open; close() wipes its key
    key_secret: str | None = None
    updating_keys: bool = False
    meta: qcow2.Qcow2Metadata | None = None

    def child_perms(self) -> tuple[Perm, Perm]:
        return format_child_perms(read_only=self.read_only, updating_keys=self.updating_keys,
                                  metadata=self.driver == "qcow2")

    def luks_io(self, file_node: FileNode) -> FileRegionIO:
        if self.driver == "qcow2":
            assert self.meta is not None and self.meta.crypto_header is not None
            offset, length = self.meta.crypto_header
            return FileRegionIO(file_node, offset, length)
        return FileRegionIO(file_node)

    def close(self) -> None:
        if self.volume is not None:
            self.volume.close()
            self.volume = None


def _file_handle(node: Node) -> FileNode:
    while not isinstance(node, FileBlockNode):
        assert node.file is not None
        node = node.file
    assert node.handle is not None
    return node.handle


# -- the graph -------------------------------------------------------------------

class BlockGraph:
    """Every block node of the daemon, by node-name, newest first for queries."""

    def __init__(self, secrets: SecretLookup) -> None:
        self.secrets = secrets
        self.nodes: dict[str, Node] = {}
        self._order: list[Node] = []            # creation order
        self._lock = trio.Lock()
        #: Names of nodes being opened while the lock is let go (see _unlock_volume).
        self._opening: set[str] = set()
        self._implicit_counter = 0

    # -- lookup ------------------------------------------------------------------
    def find(self, name: str) -> Node | None:
        return self.nodes.get(name)

    def _lookup_bs(self, name: str, device: str = "") -> Node:
        node = self.nodes.get(name)
        if node is None:
            raise QMPError.generic(f"Cannot find device='{device}' nor node-name='{name}'")
        return node

    def _implicit_name(self) -> str:
        while True:
            self._implicit_counter += 1
            name = f"#block{self._implicit_counter:03d}"
            if name not in self.nodes:
                return name

    def _register(self, node: Node) -> None:
        self.nodes[node.name] = node
        self._order.append(node)

    def _unregister(self, node: Node) -> None:
        self.nodes.pop(node.name, None)
        if node in self._order:
            self._order.remove(node)

    # -- permissions ---------------------------------------------------------------
    def _uses(self, node: Node, extra: list[PermissionUse] = ()) -> list[PermissionUse]:
        uses = list(extra)
        for parent in node.parents:
            perm, shared = parent.child_perms()
            uses.append(PermissionUse(f"node '{parent.name}'", "file", perm, shared))
        return uses

    async def _refresh(self, node: Node, extra: list[PermissionUse] = ()) -> None:
        """Check the users of ``node`` against each other, then move its locks."""
        uses = self._uses(node, extra)
        check_conflicts(node.name, uses)
        perm, shared = cumulative(uses)
        await _in_thread(_file_handle(node).set_perm, perm, shared)

    async def _check_only(self, node: Node, extra: list[PermissionUse] = ()) -> None:
        uses = self._uses(node, extra)
        check_conflicts(node.name, uses)
        perm, shared = cumulative(uses)
        await _in_thread(_file_handle(node).check_perm, perm, shared)

    # -- blockdev-add ----------------------------------------------------------------
    async def add(self, options: dict) -> None:
        """blockdev-add: open a node (and its inline children) or change nothing."""
        if not options.get("node-name"):
            raise QMPError.generic("'node-name' must be specified for the root node")
        async with self._lock:
            await self._open(options, implicit=False, inherited={})

    async def _open(self, options: dict, *, implicit: bool, inherited: dict) -> Node:
        driver = options["driver"]
        read_only = options.get("read-only", inherited.get("read-only", False))
        auto_read_only = options.get("auto-read-only", inherited.get("auto-read-only", False))
        cache = dict(inherited.get("cache") or {})
        cache.update(options.get("cache") or {})
        name = options.get("node-name")
        if driver == "file":
            return await self._open_file(options, name, implicit, read_only, auto_read_only, cache)
        if driver in ("luks", "qcow2"):
            return await self._open_format(options, name, implicit, read_only, auto_read_only,
                                           cache)
        raise QMPError.generic(f"Unknown driver '{driver}'")

    def _claim_name(self, name: str | None, implicit: bool) -> str:
        if name is None:
            if not implicit:
                raise QMPError.generic("'node-name' must be specified for the root node")
            return self._implicit_name()
        error = node_name_error(name)
        if error:
            raise error
        if name in self.nodes or name in self._opening:
            raise QMPError.generic(f"Duplicate nodes with node-name='{name}'")
        return name

    async def _open_file(self, options: dict, name: str | None, implicit: bool, read_only: bool,
                         auto_read_only: bool, cache: dict) -> Node:
        file_opts = FileOptions.from_qapi({**options, "read-only": read_only,
                                           "auto-read-only": auto_read_only, "cache": cache})
        handle = await _in_thread(FileNode, file_opts)
        try:
            node_name = self._claim_name(name, implicit)
        except BaseException:
            await _in_thread(handle.close)
            raise
        node = FileBlockNode(name=node_name, driver="file", implicit=implicit,
                             read_only=handle.read_only,
                             options={**options, "read-only": handle.read_only, "cache": cache},
                             handle=handle)
        self._register(node)
        return node

    async def _open_format(self, options: dict, name: str | None, implicit: bool,
                           read_only: bool, auto_read_only: bool, cache: dict) -> Node:
        driver = options["driver"]
        file_ref = options.get("file")
        created_child: Node | None = None
        if isinstance(file_ref, str):
            child = self._lookup_bs(file_ref, device=file_ref)
        elif isinstance(file_ref, dict):
            child = await self._open(file_ref, implicit=True,
                                     inherited={"read-only": read_only,
                                                "auto-read-only": auto_read_only,
                                                "cache": cache})
            created_child = child
        else:
            raise QMPError.generic("Parameter 'file' is missing")
        node: FormatNode | None = None
        try:
            node_name = self._claim_name(name, implicit)
            node = FormatNode(name=node_name, driver=driver, implicit=implicit,
                              read_only=read_only, options=dict(options), file=child)
            child.parents.insert(0, node)
            try:
                await self._refresh(child)
            except BaseException:
                child.parents.remove(node)
                raise
            try:
                await self._open_driver(node, child)
            except BaseException:
                child.parents.remove(node)
                with trio.CancelScope(shield=True):
                    await self._release(child)
                raise
        except BaseException:
            if node is not None:
                node.close()
            if created_child is not None:
                await self._close_node(created_child)
            raise
        self._register(node)
        return node

    async def _release(self, child: Node) -> None:
        try:
            await self._refresh(child)
        except QMPError:
            pass  # only dropping permissions; QEMU ignores failures here too

    async def _open_driver(self, node: FormatNode, child: Node) -> None:
        handle = _file_handle(child)
        if node.driver == "qcow2":
            size = await _in_thread(handle.size)
            node.meta = await _in_thread(
                lambda: qcow2.read_metadata(handle.pread, size, read_write=not node.read_only))
            encrypt = node.options.get("encrypt") or {}
            fmt = encrypt.get("format")
            crypt = node.meta.header.crypt_method
            if crypt == qcow2.CRYPT_NONE and fmt:
                raise QMPError.generic(
                    f"No encryption in image header, but options specified format '{fmt}'")
            if crypt == qcow2.CRYPT_LUKS and fmt and fmt != "luks":
                raise QMPError.generic(
                    f"Header reported 'luks' encryption format but options specify '{fmt}'")
            if crypt != qcow2.CRYPT_LUKS:
                return
            secret_id = encrypt.get("key-secret")
            missing = "Parameter 'encrypt.key-secret' is required for cipher"
        else:
            secret_id = node.options.get("key-secret")
            missing = "Parameter 'key-secret' is required for cipher"
        if not secret_id:
            raise QMPError.generic(missing)
        passphrase = self.secrets.lookup(secret_id)
        try:
            io = node.luks_io(handle)
            node.volume = await self._unlock_volume(
                node, lambda: open_volume(io, passphrase, payload_in_file=node.driver == "luks"))
        finally:
            _wipe(passphrase)
        node.key_secret = secret_id

    async def _unlock_volume(self, node: FormatNode, unlock: Callable[[], Any]) -> Any:
        """Run the PBKDF2 of an open without holding the graph lock.

        A header may ask for billions of iterations: that open is slow, but
        no other session's block command may wait for it. The node's name is
        reserved meanwhile, and its child already counts it as a parent (so
        it cannot be deleted under us). The work writes nothing, so a cancel
        (shutdown, a client gone) abandons the thread at once.
        """
        self._opening.add(node.name)
        self._lock.release()
        try:
            return await _abandonable(unlock, lambda volume: volume and volume.close())
        finally:
            with trio.CancelScope(shield=True):
                await self._lock.acquire()
            self._opening.discard(node.name)

    async def _close_node(self, node: Node) -> None:
        """Close ``node`` and its implicit children (already detached from parents)."""
        child = node.file
        await _in_thread(node.close)
        self._unregister(node)
        if child is not None:
            if node in child.parents:
                child.parents.remove(node)
            if child.implicit and not child.parents:
                await self._close_node(child)
            else:
                await self._release(child)

    # -- blockdev-del ----------------------------------------------------------------
    async def delete(self, node_name: str) -> None:
        async with self._lock:
            node = self.nodes.get(node_name)
            if node is None:
                raise QMPError.generic(f"Failed to find node with node-name='{node_name}'")
            if node.implicit:
                raise QMPError.generic(f"Node {node_name} is not owned by the monitor")
            if node.parents or node.busy or node.job_refs:
                raise QMPError.generic(f"Block device {node_name} is in use")
            with trio.CancelScope(shield=True):
                await self._close_node(node)

    # -- blockdev-reopen ---------------------------------------------------------------
    async def reopen(self, options_list: list[dict]) -> None:
        """blockdev-reopen (7.2): switch read-only <-> read-write, atomically."""
        async with self._lock:
            plan: list[tuple[Node, bool]] = []
            for opts in options_list:
                name = opts.get("node-name")
                if not name:
                    raise QMPError.generic("node-name not specified")
                node = self.nodes.get(name)
                if node is None:
                    raise QMPError.generic(f"Failed to find node with node-name='{name}'")
                self._plan_reopen(node, opts, bool(opts.get("read-only", False)), plan)
            with trio.CancelScope(shield=True):
                await self._apply_reopen(plan)

    def _plan_reopen(self, node: Node, opts: dict, read_only: bool,
                     plan: list[tuple[Node, bool]]) -> None:
        """Check one node's reopen options and queue it, with its implicit child.

        As QEMU's reopen queue: a child the parent created from inline
        options (given again inline or by its name) is reopened too and
        inherits the parent's read-only unless its own options say otherwise;
        a child added on its own is left alone.
        """
        if opts.get("driver") != node.driver:
            raise QMPError.generic("Cannot change the option 'driver'")
        if "node-name" in opts and opts["node-name"] != node.name:
            raise QMPError.generic("Cannot change the option 'node-name'")
        if node.driver == "file" and opts.get("filename") != node.options.get("filename"):
            raise QMPError.generic("Cannot change the option 'filename'")
        if node.busy:
            raise QMPError.generic(f"Block device {node.name} is in use")
        plan.append((node, read_only))
        child, ref = node.file, opts.get("file")
        if child is None or ref is None:
            return
        if isinstance(ref, dict) and child.implicit:
            self._plan_reopen(child, ref, bool(ref.get("read-only", read_only)), plan)
        elif ref != child.name:
            raise QMPError.generic("Cannot change the option 'file'")
        elif child.implicit:
            self._plan_reopen(child, {**child.options, "node-name": child.name}, read_only, plan)

    async def _apply_reopen(self, plan: list[tuple[Node, bool]]) -> None:
        old = {node: node.read_only for node, _ in plan}
        made_writable: list[FileBlockNode] = []
        try:
            for node, ro in plan:
                if isinstance(node, FileBlockNode) and not ro and node.read_only:
                    assert node.handle is not None
                    await _in_thread(node.handle.reopen, False)
                    made_writable.append(node)
            for node, ro in plan:
                node.read_only = ro
            for child in self._files_under(node for node, _ in plan):
                await self._refresh(child)
            for node, ro in plan:
                if isinstance(node, FileBlockNode) and ro and node.handle is not None \
                        and not node.handle.read_only:
                    await _in_thread(node.handle.reopen, True)
        except BaseException:
            for node, ro in old.items():
                node.read_only = ro
            for node in made_writable:
                assert node.handle is not None
                await _in_thread(node.handle.reopen, True)
            for child in self._files_under(old):
                await self._release(child)
            raise
        for node, ro in plan:
            node.options["read-only"] = ro

    def _files_under(self, nodes) -> list[Node]:
        out: list[Node] = []
        for node in nodes:
            target = node if isinstance(node, FileBlockNode) else node.file
            if target is not None and target not in out:
                out.append(target)
        return out

    # -- query-named-block-nodes -----------------------------------------------------
    def query_named_block_nodes(self, flat: bool = False) -> list[dict]:
        """BlockDeviceInfo of every node, newest first (QEMU's order).

        Reads only cached state plus one fstat per node; ``flat`` only
        matters for backing chains, which this daemon does not open.
        """
        return [self._device_info(node) for node in reversed(self._order)]

    def _filename(self, node: Node) -> str:
        if isinstance(node, FileBlockNode):
            return node.options["filename"]
        assert isinstance(node, FormatNode) and node.file is not None
        child = _file_handle(node)
        inner = {"driver": "file", "filename": child.filename}
        if node.driver == "luks":
            spec = {"driver": "luks", "file": inner, "key-secret": node.key_secret}
        elif node.key_secret:
            spec = {"encrypt.key-secret": node.key_secret, "driver": "qcow2", "file": inner}
        else:
            return child.filename
        return "json:" + json.dumps(spec)

    def _image_info(self, node: Node) -> dict:
        handle = _file_handle(node)
        try:
            file_size = handle.size()
            actual = handle.allocated_size()
        except (OSError, ValueError):
            file_size = actual = 0
        info: dict = {"filename": self._filename(node), "format": node.driver,
                      "actual-size": actual, "dirty-flag": False}
        if isinstance(node, FileBlockNode):
            info["virtual-size"] = file_size
            return info
        assert isinstance(node, FormatNode)
        luks = node.volume.info() if node.volume is not None else None
        if node.driver == "luks":
            info["virtual-size"] = max(0, file_size - (node.volume.payload_offset if node.volume else 0))
            info["encrypted"] = True
            if luks is not None:
                info["format-specific"] = {"type": "luks", "data": luks}
        else:
            assert node.meta is not None
            info["virtual-size"] = node.meta.header.size
            info["cluster-size"] = node.meta.header.cluster_size
            data = qcow2.format_specific_info(node.meta)
            if luks is not None:
                data["encrypt"] = {"format": "luks", **luks}
            info["format-specific"] = {"type": "qcow2", "data": data}
            if node.meta.header.crypt_method:
                info["encrypted"] = True
        return info

    def _device_info(self, node: Node) -> dict:
        cache = node.options.get("cache") or {}
        encrypted = isinstance(node, FormatNode) and (
            node.driver == "luks" or bool(node.meta and node.meta.header.crypt_method))
        return {
            "iops_rd": 0, "detect_zeroes": node.options.get("detect-zeroes", "off"),
            "image": self._image_info(node), "iops_wr": 0, "ro": node.read_only,
            "node-name": node.name, "backing_file_depth": 0, "drv": node.driver,
            "iops": 0, "bps_wr": 0, "write_threshold": 0, "encrypted": encrypted,
            "bps": 0, "bps_rd": 0,
            "cache": {"no-flush": bool(cache.get("no-flush", False)),
                      "direct": bool(cache.get("direct", False)), "writeback": True},
            "file": self._filename(node),
        }

    # -- blockdev-amend ----------------------------------------------------------------
    def amend_precheck(self, node_name: str, options: dict, command: str) -> FormatNode:
        """The checks QEMU makes before it creates the amend job, with its texts."""
        node = self._lookup_bs(node_name)
        if options.get("driver") != node.driver:
            raise QMPError.generic(f"{command} doesn't support changing the block driver")
        if not isinstance(node, FormatNode):
            raise QMPError.generic(f"Driver does not support {command}")
        return node

    @staticmethod
    def _amend_check_writable(node: FormatNode) -> None:
        """QEMU's luks driver asks for WRITE on its file before the update
        (after the job exists); qcow2 already holds it, or fails at the write."""
        if node.driver == "luks" and _file_handle(node).read_only:
            raise QMPError.generic("Block node is read-only")

    async def amend_check_permissions(self, node_name: str, options: dict, command: str) -> None:
        """Would the key update get its permissions now? Takes nothing.

        QEMU 7.2 takes them when the job is created, so a conflict is the
        command's error there; handlers call this to answer the same way.
        """
        node = self.amend_precheck(node_name, options, command)
        if not self._amend_has_work(node, options):
            return
        self._amend_check_writable(node)
        if _file_handle(node).read_only:
            return  # qcow2: QEMU fails this in the job, at the first write
        async with self._lock:
            node.updating_keys = True
            try:
                await self._check_only(node.file)
            finally:
                node.updating_keys = False

    def _amend_has_work(self, node: FormatNode, options: dict) -> bool:
        return node.driver == "luks" or options.get("encrypt") is not None

    def _luks_amend_options(self, node: FormatNode, options: dict, force: bool):
        if node.driver == "qcow2":
            opts = options.get("encrypt")
            if node.volume is None:
                raise QMPError.generic("Can't amend encryption options - encryption not present")
            if opts.get("format", "luks") != "luks":
                raise QMPError.generic("Only LUKS encryption options can be amended")
        else:
            opts = options
        secrets: list[bytearray] = []

        def lazy(secret_id: str | None):
            """Looked up where QEMU looks it up (see LuksAmendOptions), then wiped."""
            if secret_id is None:
                return None

            def lookup() -> bytearray:
                value = self.secrets.lookup(secret_id)
                secrets.append(value)
                return value

            return lookup

        amend = LuksAmendOptions(state=opts["state"], new_secret=lazy(opts.get("new-secret")),
                                 old_secret=lazy(opts.get("old-secret")),
                                 keyslot=opts.get("keyslot"), iter_time=opts.get("iter-time"),
                                 secret=lazy(opts.get("secret")), force=force)
        if amend.state == "active" and amend.secret is None and node.key_secret:
            amend.opened_secret = lazy(node.key_secret)
        return amend, secrets

    async def amend(self, node_name: str, options: dict, force: bool, progress: Progress,
                    command: str) -> None:
        """The body of a blockdev-amend job.

        Phase 1 (cancellable): checks, PBKDF2 and AF split in a worker
        thread; nothing is written and no permission is taken. Phase 2
        (shielded): take WRITE and refuse sharing CONSISTENT_READ and WRITE,
        write the planned sectors, give the permissions back.
        """
        node = self.amend_precheck(node_name, options, command)
        progress.set(0, 1)
        if not self._amend_has_work(node, options):
            progress.set(1, 1)
            return
        self._amend_check_writable(node)
        amend_opts, secrets = self._luks_amend_options(node, options, force)
        node.busy = "amend"
        try:
            handle = _file_handle(node)
            io = node.luks_io(handle)
            # Reads and computes only: a cancelled job need not wait for PBKDF2
            # (a slot may claim billions of iterations).
            plan = await _abandonable(lambda: prepare_amend(node.volume, io, amend_opts),
                                      lambda _plan: _wipe_all(secrets))
            if handle.read_only:
                # A read-only qcow2 node: QEMU's qcow2 header-write callback
                # reports the refused write with this (misworded) text.
                raise QMPError.generic("Could not read encryption header: "
                                       "Operation not permitted")
            await trio.lowlevel.checkpoint_if_cancelled()
            with trio.CancelScope(shield=True):
                async with self._lock:
                    node.updating_keys = True
                    try:
                        await self._refresh(node.file)
                    except BaseException:
                        node.updating_keys = False
                        await self._release(node.file)
                        raise
                try:
                    await _in_thread(apply_amend, plan, io)
                finally:
                    async with self._lock:
                        node.updating_keys = False
                        await self._release(node.file)
        finally:
            node.busy = None
            for value in secrets:
                _wipe(value)
        progress.set(1, 1)

    # -- blockdev-create -----------------------------------------------------------------
    async def create(self, options: dict, progress: Progress) -> None:
        """The body of a blockdev-create job for file, luks and qcow2."""
        driver = options["driver"]
        progress.set(0, 1)
        if driver == "file":
            await _in_thread(create_file, options)
        elif driver in ("luks", "qcow2"):
            await self._create_format(options)
        else:
            raise QMPError.generic(f"Driver '{driver}' does not support blockdev-create")
        progress.set(1, 1)

    async def _create_format(self, options: dict) -> None:
        driver = options["driver"]
        ref = options["file"]
        if isinstance(ref, dict):
            raise QMPError.generic("blockdev-create needs 'file' as a reference to an existing node")
        async with self._lock:
            target = self._lookup_bs(ref, device=ref)
        if driver == "qcow2":
            self._check_qcow2_create(options)
            crypto = options.get("encrypt")
        else:
            crypto = options
        luks_opts = passphrase = None
        if crypto is not None:
            luks_opts = luks_create_options(crypto)
            secret_id = crypto.get("key-secret")
            if not secret_id:
                raise QMPError.generic("Parameter 'key-secret' is required for cipher")
            passphrase = self.secrets.lookup(secret_id)
        user = PermissionUse("a blockdev-create job", "file", Perm.WRITE | Perm.RESIZE,
                             ALL & ~Perm.RESIZE)
        try:
            async with self._lock:
                await self._refresh(target, [user])
            try:
                handle = _file_handle(target)
                if driver == "luks":
                    await _in_thread(write_luks_image, handle, options, luks_opts, passphrase)
                else:
                    await _in_thread(write_qcow2_image, handle, options, luks_opts, passphrase)
            finally:
                with trio.CancelScope(shield=True):
                    async with self._lock:
                        await self._release(target)
        finally:
            _wipe(passphrase)

    @staticmethod
    def _check_qcow2_create(options: dict) -> None:
        if options.get("backing-file") or options.get("backing-fmt"):
            raise QMPError.generic("qmpd does not create qcow2 images with a backing file")
        if options.get("data-file") or options.get("data-file-raw"):
            raise QMPError.generic("qmpd does not create qcow2 images with an external data file")
        if options.get("extended-l2"):
            raise QMPError.generic("qmpd does not create qcow2 images with extended L2 entries")
        prealloc = options.get("preallocation", "off")
        if prealloc != "off":
            raise QMPError.generic(f"qmpd creates qcow2 images with preallocation=off only, "
                                   f"not '{prealloc}'")
        encrypt = options.get("encrypt")
        if encrypt is not None and encrypt.get("format") != "luks":
            raise QMPError.generic("Use of AES-CBC encrypted qcow2 images is no longer "
                                   "supported in system emulators")

    # -- shutdown --------------------------------------------------------------------
    async def close_all(self) -> None:
        """Close every node, parents before children; wipes every volume key."""
        with trio.CancelScope(shield=True):
            async with self._lock:
                for node in list(reversed(self._order)):
                    if node.name in self.nodes and not node.parents:
                        await self._close_node(node)
                for node in list(reversed(self._order)):
                    await _in_thread(node.close)
                    self._unregister(node)


# -- image creation (worker threads) --------------------------------------------------

def luks_create_options(opts: dict):
    """QCryptoBlockCreateOptionsLUKS (dashed keys) to the engine's options."""
    return LuksCreateOptions(
        cipher_alg=opts.get("cipher-alg", "aes-256"),
        cipher_mode=opts.get("cipher-mode", "xts"),
        ivgen_alg=opts.get("ivgen-alg"),
        ivgen_hash_alg=opts.get("ivgen-hash-alg"),
        hash_alg=opts.get("hash-alg", "sha256"),
        iter_time=opts.get("iter-time", DEFAULT_ITER_TIME))


def _preallocate(fd: int, start: int, end: int, mode: str) -> None:
    if end <= start or mode in ("off", "metadata"):
        return
    if mode == "falloc":
        os.posix_fallocate(fd, start, end - start)
    elif mode == "full":
        chunk = bytes(1 << 20)
        offset = start
        while offset < end:
            n = min(len(chunk), end - offset)
            os.pwrite(fd, chunk[:n], offset)
            offset += n


def create_file(options: dict) -> None:
    """blockdev-create driver=file, as QEMU's raw_co_create: lock, truncate, size."""
    filename = options["filename"]
    size = options["size"]
    prealloc = options.get("preallocation", "off")
    if prealloc not in ("off", "falloc", "full", "metadata"):
        raise QMPError.generic(f"Unsupported preallocation mode: {prealloc}")
    try:
        fd = os.open(filename, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise QMPError.generic(f"Could not create '{filename}': "
                               f"{os.strerror(err.errno or errno.EIO)}") from None
    try:
        lock = ImageLock(fd, enabled=True)
        lock.update(Perm.WRITE | Perm.RESIZE, ALL & ~Perm.RESIZE)
        try:
            os.ftruncate(fd, 0)
            os.ftruncate(fd, size)
            _preallocate(fd, 0, size, prealloc)
        except OSError as err:
            raise QMPError.generic(f"Could not resize file: {os.strerror(err.errno or errno.EIO)}") \
                from None
    finally:
        os.close(fd)


def write_luks_image(handle: FileNode, options: dict, luks_opts, passphrase: bytearray) -> None:
    """blockdev-create driver=luks: header at 0, then a payload of ``size`` bytes."""
    try:
        length = header_length(luks_opts)
        handle.truncate(0)
        volume = create_volume(FileRegionIO(handle), passphrase, luks_opts)
        volume.close()
        handle.truncate(length + options["size"])
        _preallocate_handle(handle, length, length + options["size"],
                            options.get("preallocation", "off"))
        handle.flush()
    except CryptoError as err:
        raise QMPError.generic(str(err)) from None


def _preallocate_handle(handle: FileNode, start: int, end: int, mode: str) -> None:
    if mode in ("falloc", "full"):
        with handle._mutex:
            _preallocate(handle._fd, start, end, mode)


def write_qcow2_image(handle: FileNode, options: dict, luks_opts, passphrase) -> None:
    """blockdev-create driver=qcow2: metadata, then the LUKS header, then the header cluster.

    The header cluster goes last, so an interrupted creation leaves a file
    that is not a qcow2 image rather than one that points at garbage.
    """
    size = options["size"]
    version = options.get("version", "v3")
    cluster_size = options.get("cluster-size", 65536)
    refcount_bits = options.get("refcount-bits", 16)
    lazy = bool(options.get("lazy-refcounts", False))
    qcow2.check_create_options(size, cluster_size, refcount_bits, version, lazy)
    try:
        crypto_length = header_length(luks_opts) if luks_opts is not None else 0
        layout = qcow2.plan_layout(size, cluster_size, refcount_bits, crypto_length)
        writes = qcow2.metadata_writes(layout, size, version, lazy_refcounts=lazy,
                                       crypto_length=crypto_length)
        if options.get("compression-type", "zlib") == "zstd":
            raise QMPError.generic("qmpd creates qcow2 images with compression-type=zlib only")
        handle.truncate(0)
        for offset, data in writes[:-1]:
            handle.pwrite(offset, data)
        if luks_opts is not None:
            region = FileRegionIO(handle, layout.crypto_cluster * cluster_size, crypto_length)
            volume = create_volume(region, passphrase, luks_opts, payload_in_file=False)
            volume.close()
        handle.truncate(layout.file_length)
        handle.flush()
        handle.pwrite(*writes[-1])
        handle.flush()
    except CryptoError as err:
        raise QMPError.generic(str(err)) from None
