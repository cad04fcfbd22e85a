"""What a driver module declares: QEMU's BlockDriver, in small.

A protocol driver (file) opens its node from options alone; a format
driver (raw, luks, qcow2) names its node class, and the generic open in
blockdev.py opens or finds the ``file`` child, attaches the new node to it
and then calls the node's ``open_image``. ``create`` is the driver's
blockdev-create; amend, resize, reopen and query hooks are methods of the
node classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable

if TYPE_CHECKING:  # pragma: no cover
    from qmpd.block.graph import BlockGraph
    from qmpd.block.node import Node


@dataclass(frozen=True)
class OpenFlags:
    """The options a node inherits from its parent unless it sets its own."""

    read_only: bool = False
    auto_read_only: bool = False
    cache: dict = field(default_factory=dict)

    @classmethod
    def for_node(cls, options: dict, inherited: "OpenFlags | None") -> "OpenFlags":
        base = inherited or cls()
        cache = dict(base.cache)
        cache.update(options.get("cache") or {})
        return cls(
            read_only=options.get("read-only", base.read_only),
            auto_read_only=options.get("auto-read-only", base.auto_read_only),
            cache=cache,
        )


ProtocolOpen = Callable[["BlockGraph", dict, "str | None", bool, OpenFlags], Awaitable["Node"]]
#: blockdev-create: ``(graph, options)`` for a protocol driver, ``(graph,
#: options, target)`` for a format driver (target: the node of its ``file``).
Create = Callable[..., Awaitable[None]]


@dataclass(frozen=True)
class BlockDriver:
    name: str
    #: Protocol drivers: open the node from its options.
    open: ProtocolOpen | None = None
    #: Format drivers: the node class (constructed by the generic open).
    node_class: Any = None
    create: Create | None = None
