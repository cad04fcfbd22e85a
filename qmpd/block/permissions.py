"""QEMU's block permission model, as data.

Every user of a node (a parent node through a named child, or a job) holds a
pair: the permissions it takes and the permissions it lets others take.
QEMU 7.2 knows four permissions (GRAPH_MOD was dropped in 7.0); their bit
order is also the order of the image lock bytes (100+n, 200+n).

A conflict exists when one user takes a permission another does not share.
QEMU walks the parents of a node newest first, for each pair (a, b) checking
whether a shares what b takes; the first failure gives its message, so the
order of ``uses`` matters and is kept the same here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Iterable

from qmpd.errors import QMPError


class Perm(enum.IntFlag):
    CONSISTENT_READ = 0x1
    WRITE = 0x2
    WRITE_UNCHANGED = 0x4
    RESIZE = 0x8


NONE = Perm(0)
ALL = Perm.CONSISTENT_READ | Perm.WRITE | Perm.WRITE_UNCHANGED | Perm.RESIZE

#: Names as QEMU prints them in error messages (bdrv_perm_names).
PERM_NAMES: dict[Perm, str] = {
    Perm.CONSISTENT_READ: "consistent read",
    Perm.WRITE: "write",
    Perm.WRITE_UNCHANGED: "write unchanged",
    Perm.RESIZE: "resize",
}

#: Bit index n of each permission: lock bytes 100+n and 200+n.
PERM_ORDER: tuple[Perm, ...] = (Perm.CONSISTENT_READ, Perm.WRITE, Perm.WRITE_UNCHANGED, Perm.RESIZE)


def perm_names(perm: Perm) -> str:
    """ "write, resize": the names of the set bits in bit order."""
    return ", ".join(PERM_NAMES[p] for p in PERM_ORDER if perm & p)


@dataclass(frozen=True)
class PermissionUse:
    """One user's claim on a node.

    ``user`` is how QEMU describes the user ("node 'q0'"); ``child_name`` is
    the name of the edge ("file").
    """

    user: str
    child_name: str
    perm: Perm
    shared: Perm


def cumulative(uses: Iterable[PermissionUse]) -> tuple[Perm, Perm]:
    """The union of the permissions taken and the intersection of those shared."""
    perm, shared = NONE, ALL
    for use in uses:
        perm |= use.perm
        shared &= use.shared
    return perm, shared


def check_conflicts(node_name: str, uses: list[PermissionUse]) -> None:
    """Raise QEMU's "Permission conflict" error for the first clash.

    ``uses`` is newest first, like QEMU's list of parents.
    """
    for a in uses:
        for b in uses:
            if a is b:
                continue
            clash = b.perm & ~a.shared & ALL
            if clash:
                raise QMPError.generic(
                    f"Permission conflict on node '{node_name}': permissions "
                    f"'{perm_names(Perm(clash))}' are both required by {b.user} "
                    f"(uses node '{node_name}' as '{b.child_name}' child) and "
                    f"unshared by {a.user} (uses node '{node_name}' as "
                    f"'{a.child_name}' child)."
                )


def format_child_perms(
    *, read_only: bool, updating_keys: bool = False, metadata: bool
) -> tuple[Perm, Perm]:
    """What a format node (qcow2, luks) takes on its file child, as QEMU 7.2.

    A qcow2 node is a full format driver: it always reads its metadata
    consistently and, when writable, writes and grows its file, sharing
    neither. The luks driver asks only for consistent read until something
    needs more (QEMU keeps it that way for backward compatibility). While
    keys are being rewritten the node also writes the header and lets nobody
    else read or write meanwhile.
    """
    perm, shared = Perm.CONSISTENT_READ, ALL
    if metadata:
        shared &= ~(Perm.WRITE | Perm.RESIZE)
        if not read_only:
            perm |= Perm.WRITE | Perm.RESIZE
    if updating_keys:
        perm |= Perm.WRITE
        shared &= ~(Perm.CONSISTENT_READ | Perm.WRITE)
    return perm, shared
