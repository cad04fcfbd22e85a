"""blockdev-add, blockdev-del and blockdev-reopen: nodes in and out of the graph.

A format node's ``file`` child is given inline (an options dict, opened as
an implicit ``#blockNNN`` node that lives and dies with its parent) or by
reference to an existing node-name. The generic open here finds or opens
the child, attaches the new node to it (so its permissions are checked
before the driver reads a byte) and then lets the driver open the image.
A driver's other BlockdevRef options (``Node.optional_children``: luks's
``header``) are opened the same way, after ``file``, as children named
after the option; reopen treats them as it treats ``file``.
"""

from __future__ import annotations

import trio

from qmpd.block.drivers import DRIVERS
from qmpd.block.drivers.base import OpenFlags
from qmpd.block.drivers.file import FileBlockNode, FileNode
from qmpd.block.graph import BlockGraph
from qmpd.block.node import Node, in_thread
from qmpd.errors import QMPError
from qmpd.qdict import qdict_order


async def add(graph: BlockGraph, options: dict) -> None:
    """blockdev-add: open a node (and its inline children) or change nothing."""
    if not options.get("node-name"):
        raise QMPError.generic("'node-name' must be specified for the root node")
    async with graph.lock:
        await open_node(graph, options, implicit=False, inherited=None)


async def open_node(
    graph: BlockGraph, options: dict, *, implicit: bool, inherited: OpenFlags | None
) -> Node:
    """Open one node from its options (the caller holds the graph lock)."""
    driver = DRIVERS.get(options["driver"])
    if driver is None:
        raise QMPError.generic(f"Unknown driver '{options['driver']}'")
    flags = OpenFlags.for_node(options, inherited)
    name = options.get("node-name")
    if driver.open is not None:
        return await driver.open(graph, options, name, implicit, flags)
    return await _open_format(graph, driver.node_class, options, name, implicit, flags)


async def _child(graph: BlockGraph, ref: str | dict, flags: OpenFlags, created: list[Node]) -> Node:
    """The node a BlockdevRef names, or a new implicit one (added to ``created``)."""
    if isinstance(ref, str):
        return graph.lookup_bs(ref, device=ref)
    child = await open_node(graph, ref, implicit=True, inherited=flags)
    created.append(child)
    return child


async def _open_format(
    graph: BlockGraph, node_class, options: dict, name: str | None, implicit: bool, flags: OpenFlags
) -> Node:
    node_class.check_options(options)
    file_ref = options.get("file")
    if not isinstance(file_ref, (str, dict)):
        raise QMPError.generic("Parameter 'file' is missing")
    created: list[Node] = []
    node: Node | None = None
    try:
        children = {"file": await _child(graph, file_ref, flags, created)}
        for role in node_class.optional_children:
            ref = options.get(role)
            if ref is not None:
                children[role] = await _child(graph, ref, flags, created)
        node_name = graph.claim_name(name, implicit)
        node = node_class(
            node_name, implicit=implicit, read_only=flags.read_only, options=dict(options)
        )
        attached: list[Node] = []
        try:
            for role, child in children.items():
                node.children[role] = child
                await graph.attach(node, child)
                attached.append(child)
            await node.open_image(graph)
        except BaseException:
            for child in reversed(attached):
                await graph.detach(node, child)
            raise
    except BaseException:
        if node is not None:
            await in_thread(node.close)
        with trio.CancelScope(shield=True):
            for child in reversed(created):
                await graph.close_node(child)
        raise
    graph.register(node)
    return node


async def delete(graph: BlockGraph, node_name: str) -> None:
    """blockdev-del: close a node nobody uses, with the implicit children only it used."""
    async with graph.lock:
        node = graph.find(node_name)
        if node is None:
            raise QMPError.generic(f"Failed to find node with node-name='{node_name}'")
        if any(not isinstance(user, Node) for user in node.parents):  # an export
            raise QMPError.generic(f"Node {node_name} is in use")
        if node.implicit:
            raise QMPError.generic(f"Node {node_name} is not owned by the monitor")
        if node.parents or node.busy or node.job_refs:
            raise QMPError.generic(f"Block device {node_name} is in use")
        with trio.CancelScope(shield=True):
            await graph.close_node(node)


# -- blockdev-reopen ------------------------------------------------------------------


async def reopen(graph: BlockGraph, options_list: list[dict]) -> None:
    """blockdev-reopen (7.2): switch read-only <-> read-write, atomically."""
    async with graph.lock:
        plan: list[tuple[Node, bool, dict]] = []
        for opts in options_list:
            name = opts.get("node-name")
            if not name:
                raise QMPError.generic("node-name not specified")
            node = graph.find(name)
            if node is None:
                raise QMPError.generic(f"Failed to find node with node-name='{name}'")
            _plan_reopen(
                node, opts, bool(opts.get("read-only", False)), plan, opts.get("read-only")
            )
        with trio.CancelScope(shield=True):
            await _apply_reopen(graph, plan)


#: Options every driver's reopen takes (QEMU's bdrv_reset_options_allowed
#: common_options and what bdrv_reopen_prepare consumes itself).
COMMON_REOPEN_OPTIONS = frozenset(
    {
        "node-name",
        "driver",
        "discard",
        "cache.direct",
        "cache.no-flush",
        "read-only",
        "auto-read-only",
        "detect-zeroes",
    }
)


def _flatten(
    options: dict, children: frozenset[str] = frozenset({"file"}), prefix: str = ""
) -> dict[str, object]:
    """Dotted keys, as QEMU's bs->options holds them; the children's options
    aside (QEMU removes them from bs->options once the children are open)."""
    out: dict[str, object] = {}
    for key, value in options.items():
        if not prefix and key in children:
            continue
        if isinstance(value, dict):
            out.update(_flatten(value, children, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_reopen_options(node: Node, opts: dict) -> None:
    """QEMU's reopen rules: an option left out must be one that may be reset
    to its default; one given must be unchanged unless the driver changes it.
    An option naming a child the node does not have (``header`` on a luks
    node opened without one) is a change."""
    children = frozenset({"file", *node.children})
    old, new = _flatten(node.options, children), _flatten(opts, children)
    old.setdefault("driver", node.driver)
    for key in qdict_order(tuple(old)):
        if key not in new and key not in COMMON_REOPEN_OPTIONS and key not in node.reopen_mutable:
            raise QMPError.generic(f"Option '{key}' cannot be reset to its default value")
    for key in qdict_order(tuple(new)):
        if key in COMMON_REOPEN_OPTIONS or node.reopen_changes(key):
            continue
        if key not in old or old[key] != new[key]:
            raise QMPError.generic(f"Cannot change the option '{key}'")


def _plan_reopen(
    node: Node,
    opts: dict,
    read_only: bool,
    plan: list[tuple[Node, bool, dict]],
    given_read_only: bool | None,
) -> None:
    """Check one node's reopen options and queue it, with its implicit child.

    As QEMU's reopen queue: a child the parent created from inline options
    (given again inline or by its name) is reopened too; a child added on
    its own is left alone. A child given inline takes its own read-only, or
    the one the parent's options give, or the default (read-write). A child
    given by its name keeps its old options: it takes the read-only that
    the options name explicitly (``given_read_only``) and otherwise keeps
    its own, so that reopening a parent read-write without saying so over
    a child made read-only fails as in QEMU ("Block node is read-only").
    """
    if opts.get("driver") != node.driver:
        raise QMPError.generic("Cannot change the option 'driver'")
    if "node-name" in opts and opts["node-name"] != node.name:
        raise QMPError.generic("Cannot change the option 'node-name'")
    if node.busy:
        raise QMPError.generic(f"Block device {node.name} is in use")
    check_reopen_options(node, {**opts, "node-name": node.name})
    plan.append((node, read_only, opts))
    for role, child in node.children.items():  # file, then luks's header
        ref = opts.get(role)
        if ref is None:
            continue
        if isinstance(ref, dict) and child.implicit:
            given = ref.get("read-only", given_read_only)
            _plan_reopen(child, ref, bool(given), plan, given)
        elif ref != child.name:
            raise QMPError.generic(f"Cannot change the option '{role}'")
        elif child.implicit:
            child_read_only = child.read_only if given_read_only is None else given_read_only
            _plan_reopen(
                child,
                {**child.options, "node-name": child.name},
                child_read_only,
                plan,
                given_read_only,
            )


def _handle(node: Node) -> FileNode:
    """The image file of a node that holds locks (only file nodes do)."""
    assert isinstance(node, FileBlockNode)
    return node.handle


async def _apply_reopen(graph: BlockGraph, plan: list[tuple[Node, bool, dict]]) -> None:
    old = {node: node.read_only for node, _, _ in plan}
    made_writable: list[Node] = []
    files = [node for node, _, _ in plan if node.holds_locks]
    try:
        for node, ro, _ in plan:
            if node.holds_locks and not ro and node.read_only:
                await in_thread(_handle(node).reopen, False)
                made_writable.append(node)
        for node, ro, _ in plan:
            node.read_only = ro
        for node in _tops(plan):
            await graph.refresh(node)
        for node, ro, _ in plan:
            if node.holds_locks and ro and not _handle(node).read_only:
                await in_thread(_handle(node).reopen, True)
        for node, _, opts in plan:
            node.reopen_commit(opts)
    except BaseException:
        for node, ro in old.items():
            node.read_only = ro
        for node in made_writable:
            await in_thread(_handle(node).reopen, True)
        for node in _tops(plan) + files:
            await graph.release(node)
        raise
    for node, ro, _ in plan:
        node.options["read-only"] = ro


def _tops(plan: list[tuple[Node, bool, dict]]) -> list[Node]:
    """The reopened nodes whose permissions must be passed down again."""
    out: list[Node] = []
    for node, _, _ in plan:
        for target in (node, *node.children.values()):
            if target not in out:
                out.append(target)
    return out
