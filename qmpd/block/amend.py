"""blockdev-amend (x-blockdev-amend): change the keys of an encrypted node.

The plan/apply split of the LUKS engine, in two phases:

1. (cancellable) checks, PBKDF2 and AF split in a worker thread; nothing
   is written and no permission is taken;
2. (shielded) take WRITE and refuse sharing CONSISTENT_READ and WRITE on
   the child the header is in (``file``; a luks node's detached
   ``header``), write the planned sectors, give the permissions back.

Guest I/O through the node goes on during both: the volume key does not
change, and the header sectors are not the payload's.
"""

from __future__ import annotations

from typing import Protocol

import trio

from qmpd import handoff
from qmpd.block.drivers.luks import EncryptedNode
from qmpd.block.graph import BlockGraph, abandonable
from qmpd.block.node import in_thread
from qmpd.crypto.secrets import wipe
from qmpd.errors import QMPError


class Progress(Protocol):
    def set(self, current: int, total: int) -> None: ...


def precheck(graph: BlockGraph, node_name: str, options: dict, command: str) -> EncryptedNode:
    """The checks QEMU makes before it creates the amend job, with its texts."""
    node = graph.lookup_bs(node_name)
    if options.get("driver") != node.driver:
        raise QMPError.generic(f"{command} doesn't support changing the block driver")
    if not isinstance(node, EncryptedNode):
        raise QMPError.generic(f"Driver does not support {command}")
    return node


async def check_permissions(graph: BlockGraph, node_name: str, options: dict, command: str) -> None:
    """Would the key update get its permissions now? Takes nothing.

    QEMU 7.2 takes them when the job is created, so a conflict is the
    command's error there; handlers call this to answer the same way.
    """
    node = precheck(graph, node_name, options, command)
    if node.amend_crypto_options(options) is None:
        return
    node.amend_check_writable()
    key_node = node.key_node()
    if key_node.leaf().read_only:
        return  # qcow2: QEMU fails this in the job, at the first write
    async with graph.lock:
        node.updating_keys = True
        try:
            await graph.refresh(key_node, check_only=True)
        finally:
            node.updating_keys = False


async def run(
    graph: BlockGraph, node_name: str, options: dict, force: bool, progress: Progress, command: str
) -> None:
    """The body of a blockdev-amend job; amends of one node run one after
    the other (the second plans on the header the first wrote), as QEMU's
    graph serialises them."""
    node = precheck(graph, node_name, options, command)
    progress.set(0, 1)
    if node.key_update_lock.locked():
        handoff.notify()  # waits for the amend before it
    async with node.key_update_lock:
        await _run(graph, node, options, force)
    progress.set(1, 1)


async def _run(graph: BlockGraph, node: EncryptedNode, options: dict, force: bool) -> None:
    crypto = node.amend_crypto_options(options)
    if crypto is None:
        return
    node.amend_check_writable()
    amend_opts, secrets = node.amend_options(graph, crypto, force)
    node.busy = "amend"
    try:
        node.precheck_amend(amend_opts)

        # Reads and computes only: a cancelled job need not wait for PBKDF2
        # (a slot may claim billions of iterations).
        def wipe_secrets(_plan: object) -> None:
            for value in secrets:
                wipe(value)

        plan = await abandonable(lambda: node.prepare_amend(amend_opts), wipe_secrets)
        refused = node.amend_read_only_error()
        if refused is not None:
            raise refused
        await trio.lowlevel.checkpoint_if_cancelled()
        file = node.key_node()
        with trio.CancelScope(shield=True):
            async with graph.lock:
                node.updating_keys = True
                try:
                    await graph.refresh(file)
                except BaseException:
                    node.updating_keys = False
                    await graph.release(file)
                    raise
            try:
                await in_thread(node.apply_amend, plan)
            finally:
                async with graph.lock:
                    node.updating_keys = False
                    await graph.release(file)
    finally:
        node.busy = None
        for value in secrets:
            wipe(value)
