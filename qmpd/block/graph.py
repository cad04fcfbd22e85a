"""The node graph: the registry of nodes, the graph lock, children and permissions.

Nothing here knows a driver. Verbs (blockdev.py, create.py, amend.py,
query.py, resize.py) and exports change the graph through these calls
while holding :attr:`BlockGraph.lock`; drivers open nodes and attach their
children through them.

Permissions follow QEMU 7.2 (see permissions.py): each user of a node (a
parent node, an export, a job) holds a (perm, shared) pair on it; the graph
checks the pairs of all users against each other, newest first, remembers
their union as the node's ``parent_perms`` and goes down: a node passes
permissions on to its children through its driver's ``child_perms``, and a
file node at the bottom moves its OFD lock bytes.

Concurrency: graph changes run on the trio thread under one trio lock;
lock bytes and every file access run in worker threads.
"""

from __future__ import annotations

import re
import threading
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Iterable, TypeVar

import trio

from qmpd.block.node import Node, Parent, SecretLookup, in_thread
from qmpd.block.permissions import Perm, PermissionUse, check_conflicts, cumulative
from qmpd.errors import QMPError

T = TypeVar("T")

_NODE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")
NODE_NAME_MAX = 31


def node_name_error(name: str) -> QMPError | None:
    """QEMU's bdrv_assign_node_name checks (id_wellformed, length)."""
    if not _NODE_NAME.match(name):
        return QMPError.generic(f"Invalid node-name: '{name}'")
    if len(name) > NODE_NAME_MAX:
        return QMPError.generic("Node name too long")
    return None


async def abandonable(fn: Callable[[], T], discard: Callable[[T | None], object]) -> T:
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
        return await in_thread(work, abandon_on_cancel=True)
    except trio.Cancelled:
        with lock:
            state["abandoned"] = True
            late = state.pop("result", None)
        if late is not None:
            discard(late)
        raise


class BlockGraph:
    """Every block node of the daemon, by node-name, in creation order."""

    def __init__(self, secrets: SecretLookup) -> None:
        self.secrets = secrets
        self.nodes: dict[str, Node] = {}
        self._order: list[Node] = []
        self.lock = trio.Lock()
        #: Names of nodes being opened while the lock is let go (see unlocked).
        self._opening: set[str] = set()
        self._implicit_counter = 0

    # -- the registry ------------------------------------------------------------
    def find(self, name: str) -> Node | None:
        return self.nodes.get(name)

    def lookup_bs(self, name: str, device: str = "") -> Node:
        node = self.nodes.get(name)
        if node is None:
            raise QMPError.generic(f"Cannot find device='{device}' nor node-name='{name}'")
        return node

    def newest_first(self) -> list[Node]:
        return list(reversed(self._order))

    def claim_name(self, name: str | None, implicit: bool) -> str:
        """The node-name a new node gets: checked, unique, or a ``#blockNNN``."""
        if name is None:
            if not implicit:
                raise QMPError.generic("'node-name' must be specified for the root node")
            while True:
                self._implicit_counter += 1
                name = f"#block{self._implicit_counter:03d}"
                if name not in self.nodes:
                    return name
        error = node_name_error(name)
        if error:
            raise error
        if name in self.nodes or name in self._opening:
            raise QMPError.generic(f"Duplicate nodes with node-name='{name}'")
        return name

    def register(self, node: Node) -> None:
        self.nodes[node.name] = node
        self._order.append(node)

    def unregister(self, node: Node) -> None:
        self.nodes.pop(node.name, None)
        if node in self._order:
            self._order.remove(node)

    @asynccontextmanager
    async def unlocked(self, reserved_name: str) -> AsyncIterator[None]:
        """Let go of the graph lock for slow work that writes nothing (PBKDF2
        of an open): other sessions' block commands go on meanwhile, and the
        node's name stays reserved."""
        self._opening.add(reserved_name)
        self.lock.release()
        try:
            yield
        finally:
            with trio.CancelScope(shield=True):
                await self.lock.acquire()
            self._opening.discard(reserved_name)

    # -- permissions ---------------------------------------------------------------
    @staticmethod
    def uses(node: Node, extra: Iterable[PermissionUse] = ()) -> list[PermissionUse]:
        uses = list(extra)
        for parent in node.parents:
            perm, shared = parent.child_perms(node)
            uses.append(
                PermissionUse(parent.user_description, parent.child_role(node), perm, shared)
            )
        return uses

    async def refresh(
        self, node: Node, extra: Iterable[PermissionUse] = (), *, check_only: bool = False
    ) -> None:
        """Check the users of ``node`` against each other, then pass the
        result down to its image locks (``check_only``: take nothing)."""
        uses = self.uses(node, extra)
        check_conflicts(node.name, uses)
        perm, shared = cumulative(uses)
        old = node.parent_perms
        check_writable(node, perm, old[0])
        node.parent_perms = (perm, shared)
        try:
            if node.holds_locks:
                await in_thread(node.check_locks if check_only else node.update_locks, perm, shared)
            for child in node.children.values():
                await self.refresh(child, check_only=check_only)
        except BaseException:
            node.parent_perms = old
            raise
        finally:
            if check_only:
                node.parent_perms = old

    async def release(self, node: Node) -> None:
        """Refresh after a user let go: only drops permissions, so a failure
        here is ignored (QEMU ignores it too)."""
        try:
            await self.refresh(node)
        except QMPError:
            pass

    async def attach(self, parent: Parent, child: Node) -> None:
        """Make ``parent`` a user of ``child`` (newest first), or change nothing."""
        child.parents.insert(0, parent)
        try:
            await self.refresh(child)
        except BaseException:
            child.parents.remove(parent)
            with trio.CancelScope(shield=True):
                await self.release(child)
            raise

    async def detach(self, parent: Parent, child: Node) -> None:
        if parent in child.parents:
            child.parents.remove(parent)
        with trio.CancelScope(shield=True):
            await self.release(child)

    # -- closing -----------------------------------------------------------------
    async def close_node(self, node: Node) -> None:
        """Close ``node`` (no parents left) and the implicit children only it used."""
        await in_thread(node.close)
        self.unregister(node)
        for child in node.children.values():
            if node in child.parents:
                child.parents.remove(node)
            if child.implicit and not child.parents:
                await self.close_node(child)
            else:
                await self.release(child)

    async def close_all(self) -> None:
        """Close every node, parents before children; wipes every volume key."""
        with trio.CancelScope(shield=True):
            async with self.lock:
                for node in self.newest_first():
                    if node.name in self.nodes and not any(
                        isinstance(p, Node) for p in node.parents
                    ):
                        node.parents.clear()
                        await self.close_node(node)
                for node in self.newest_first():
                    await in_thread(node.close)
                    self.unregister(node)


def check_writable(node: Node, perm: Perm, held: Perm) -> None:
    """QEMU's bdrv_node_refresh_perm: a read-only node (or one a reopen
    makes read-only) refuses write users, in the words that say whether it
    had some until now."""
    writes = Perm.WRITE | Perm.WRITE_UNCHANGED
    if node.read_only and perm & writes:
        if held & writes:
            raise QMPError.generic(
                f"Read-only block node '{node.name}' cannot support read-write users"
            )
        raise QMPError.generic("Block node is read-only")
