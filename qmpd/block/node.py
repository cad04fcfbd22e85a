"""A block node: what the graph links together and each driver subclasses.

A node has children (``file`` for a format node) and parents: other nodes,
exports and jobs, each holding it with a (perm, shared) pair that the graph
checks. A driver's node class adds its open state, its data path (the
synchronous methods of :class:`~qmpd.block.datapath.DataPath`) and its
hooks for queries, reopen and amend; :class:`Node` turns the data path
into async calls that each run in one worker thread.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from typing import Any, Callable, ClassVar, Protocol, TypeVar

import trio

from qmpd import handoff
from qmpd.block.datapath import BDRV_MAX_LENGTH, AlignedAccess, Extent, check_request, no_waiting
from qmpd.block.permissions import ALL, NONE, Perm
from qmpd.crypto.errors import CryptoError
from qmpd.errors import QMPError

T = TypeVar("T")

#: Reads up to this size may be served on the event loop when every byte is
#: in the page cache (see Node.read): a worker-thread hand-off costs more
#: than reading and decrypting 64 KiB.
INLINE_READ_MAX = 64 * 1024


class Parent(Protocol):
    """A user of a node: a parent node, an export, a job."""

    @property
    def user_description(self) -> str:
        """How QEMU names the user in a permission conflict ("node 'q0'")."""

    def child_perms(self, child: "Node") -> tuple[Perm, Perm]:
        """The (perm, shared) this user holds on ``child``."""

    def child_role(self, child: "Node") -> str:
        """The name of the edge ("file", "root")."""


class SecretLookup(Protocol):
    def lookup(self, secret_id: str) -> bytearray:
        """A copy of the secret's bytes (the caller wipes it), or QMPError."""


async def in_thread(fn: Callable[..., T], *args: Any, abandon_on_cancel: bool = False) -> T:
    """Run blocking block-layer work (not guest I/O) in a worker thread.

    CryptoError and OSError become QMPError with QEMU's texts here, at the
    edge between the engine and the commands; ``abandon_on_cancel`` only for
    work that writes nothing.
    """

    def call() -> T:
        try:
            return fn(*args)
        except CryptoError as err:
            raise QMPError.generic(str(err)) from None
        except OSError as err:
            raise QMPError.generic(os.strerror(err.errno or errno.EIO)) from None

    handoff.notify()
    return await trio.to_thread.run_sync(call, abandon_on_cancel=abandon_on_cancel)


class Node:
    """One node of the graph; drivers subclass it (see drivers/)."""

    driver: ClassVar[str] = ""
    #: QEMU's bl.request_alignment: the data path sees only aligned requests.
    request_alignment: int = 1

    def __init__(self, name: str, *, implicit: bool, read_only: bool, options: dict) -> None:
        self.name = name
        self.implicit = implicit
        self.read_only = read_only
        #: The options as given (normalised), for reopen's comparisons.
        self.options = options
        self.children: dict[str, Node] = {}
        self.parents: list[Parent] = []  # newest first, as QEMU
        #: The cumulative (perm, shared) of the parents, kept by the graph.
        self.parent_perms: tuple[Perm, Perm] = (NONE, ALL)
        self.busy: str | None = None  # e.g. an amend in progress
        self.job_refs = 0  # jobs that hold the node until dismissed
        self._access = AlignedAccess(self)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

    @property
    def file(self) -> "Node | None":
        return self.children.get("file")

    # -- as a parent of its children ------------------------------------------
    @property
    def user_description(self) -> str:
        return f"node '{self.name}'"

    def child_role(self, child: "Node") -> str:
        for role, node in self.children.items():
            if node is child:
                return role
        return "file"

    def child_perms(self, child: "Node") -> tuple[Perm, Perm]:
        """QEMU's filter default: pass the parents' permissions through."""
        return self.parent_perms

    #: A node at the bottom (a file) turns its users' permissions into image
    #: locks; every other node passes them on to its children.
    holds_locks: ClassVar[bool] = False

    def check_locks(self, perm: Perm, shared: Perm) -> None:
        """Would the image locks allow (perm, shared)? (files; in a thread)"""

    def update_locks(self, perm: Perm, shared: Perm) -> None:
        """Move the image locks to (perm, shared) or raise (files; in a thread)."""

    # -- reopen ----------------------------------------------------------------
    #: Options the driver lets a reopen leave out (QEMU's drv->mutable_opts).
    reopen_mutable: ClassVar[frozenset[str]] = frozenset()

    def reopen_changes(self, key: str) -> bool:
        """Whether the driver's reopen takes a new value of option ``key``."""
        return key in self.reopen_mutable

    def reopen_commit(self, options: dict) -> None:
        """Take the new options once the reopen succeeded (read-only aside)."""
        self.options = {**options, "read-only": self.read_only}

    # -- lifecycle -------------------------------------------------------------
    #: Options besides ``file`` that name a child (a BlockdevRef: inline or by
    #: node-name) which the generic open opens and attaches, under the
    #: option's name as its role, when the option is given (QEMU's
    #: bdrv_open_child with allow_none; luks's ``header``).
    optional_children: ClassVar[tuple[str, ...]] = ()

    @staticmethod
    def check_options(options: dict) -> None:
        """A format driver's checks of its own options, before its file child
        is opened (QEMU's drivers read their options first)."""

    async def open_image(self, graph: Any) -> None:
        """A format node: open the image through its ``file`` child, once the
        generic open (qmpd.block.blockdev) has attached it; every format
        driver's node class defines it. ``graph``: the BlockGraph (Any:
        qmpd.block.graph imports this module)."""

    def close(self) -> None:
        """Release what the node holds (descriptors, keys); runs in a thread."""

    # -- the data path (synchronous, thread-safe; drivers override) ------------
    def length(self) -> int:
        raise OSError(errno.ENOTSUP, "no data path")

    def unaligned(self, offset: int, length: int) -> bool:
        """Whether a request misses this node's alignment. A parent node calls
        the synchronous data path directly (raw with an offset, qcow2 inside
        LUKS), so a driver with an alignment bounces such requests through
        its AlignedAccess itself."""
        align = self.request_alignment
        return align > 1 and (offset | length) % align != 0

    def size(self) -> int:
        """The size a format parent sees of its file: the file's real size
        for a file node (not rounded), the length for any other node."""
        return self.length()

    def preallocate(self, start: int, end: int, mode: str) -> None:
        """blockdev-create's ``preallocation`` (falloc, full) of [start, end)
        under a new format header: QEMU passes it down the truncate to the
        file; drivers that pass it on override this (in a thread)."""
        raise QMPError.generic(
            f"qmpd does not preallocate through a '{self.driver}' node (preallocation '{mode}')"
        )

    def truncate(self, size: int) -> None:
        """A format parent sizing its file (qcow2 allocating, blockdev-create):
        a file node truncates the file; any other node resizes (truncate_to)."""
        self.truncate_to(size)

    def pread(self, offset: int, length: int) -> bytes:
        raise OSError(errno.ENOTSUP, "no data path")

    def pread_many(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """pread of each aligned (offset, length): drivers that decrypt
        override it to decrypt a burst of small reads in one pass."""
        return [self.pread(offset, length) for offset, length in ranges]

    def pwrite(
        self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False
    ) -> None:
        raise OSError(errno.ENOTSUP, "no data path")

    def pwrite_zeroes(
        self,
        offset: int,
        length: int,
        *,
        may_unmap: bool = False,
        fua: bool = False,
        fast: bool = False,
    ) -> None:
        """Default: write zeroes (no driver can do better without knowing more)."""
        if fast:
            raise OSError(errno.ENOTSUP, "no fast zeroes")
        chunk = 1 << 20
        while length > 0:
            n = min(chunk, length)
            self.pwrite(offset, bytes(n), fua=fua)
            offset += n
            length -= n

    def pdiscard(self, offset: int, length: int) -> None:
        """Default: ignore (discard is advisory)."""

    def flush(self) -> None:
        for child in self.children.values():
            child.flush()

    def block_status(self, offset: int, length: int) -> list[Extent]:
        return [Extent(length)]

    # -- async data path: one worker thread per request ---------------------------
    def _writable(self) -> None:
        if self.read_only:
            raise OSError(errno.EPERM, "read-only node")

    @property
    def inline_reads(self) -> bool:
        """Whether this node's read path takes no lock a thread may hold across
        I/O, so that a no-waiting read may run on the event loop (format
        drivers with metadata caches say no)."""
        return False

    def read_now(self, ranges: Sequence[tuple[int, int]]) -> list[bytes] | None:
        """The reads done here and now, on the caller's thread (the event
        loop), if none of them has to wait: every byte in the page cache,
        every lock free. None: nothing was read, use :meth:`read`.

        A burst of reads in one call lets a driver decrypt them in one pass
        (the NBD server hands over what one receive brought)."""
        if not self.inline_reads:
            return None
        size = self.length()
        for offset, length in ranges:
            if length > INLINE_READ_MAX:
                return None
            check_request(offset, length, size)
        try:
            with no_waiting():
                return self._access.pread_many(ranges)
        except BlockingIOError:
            return None  # not cached, or a lock is busy: a worker thread's job

    async def read(self, offset: int, length: int) -> bytes:
        check_request(offset, length, self.length())
        done = self.read_now(((offset, length),))
        if done is not None:
            await trio.lowlevel.checkpoint()
            return done[0]
        return await trio.to_thread.run_sync(self._access.pread, offset, length)

    async def write(
        self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False
    ) -> None:
        self._writable()
        check_request(offset, len(data), self.length())
        await trio.to_thread.run_sync(lambda: self._access.pwrite(offset, data, fua=fua))

    async def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        may_unmap: bool = False,
        fua: bool = False,
        fast: bool = False,
    ) -> None:
        self._writable()
        check_request(offset, length, self.length())
        await trio.to_thread.run_sync(
            lambda: self._access.pwrite_zeroes(
                offset, length, may_unmap=may_unmap, fua=fua, fast=fast
            )
        )

    async def discard(self, offset: int, length: int) -> None:
        self._writable()
        check_request(offset, length, self.length())
        await trio.to_thread.run_sync(self._access.pdiscard, offset, length)

    async def flush_all(self) -> None:
        await trio.to_thread.run_sync(self.flush)

    #: Block status costs no disk I/O worth a thread (a constant, or lseek
    #: SEEK_DATA/SEEK_HOLE, which QEMU's file-posix also calls in its main
    #: loop): the NBD server asks it for every structured READ.
    inline_block_status: ClassVar[bool] = False

    def block_status_now(self, offset: int, length: int) -> list[Extent] | None:
        """Block status on the caller's thread when it cannot wait (see
        inline_block_status); None: use :meth:`get_block_status`."""
        check_request(offset, length, self.length())
        if length == 0:
            return []
        return self.block_status(offset, length) if self.inline_block_status else None

    async def get_block_status(self, offset: int, length: int) -> list[Extent]:
        extents = self.block_status_now(offset, length)
        if extents is not None:
            await trio.lowlevel.checkpoint()
            return extents
        return await trio.to_thread.run_sync(self.block_status, offset, length)

    def truncate_to(self, size: int) -> None:
        """QEMU's bdrv_co_truncate (in a thread): the generic checks, in its
        order, then the driver's :meth:`resize`. Block_resize calls it on
        the node; a driver calls it on its child to resize that."""
        if size < 0:
            raise QMPError.generic("Image size cannot be negative")
        if size > BDRV_MAX_LENGTH:
            raise QMPError.generic(f"offset({size}) exceeds maximum({BDRV_MAX_LENGTH})")
        if self.read_only:
            raise QMPError.generic("Image is read-only")
        self.resize(size)

    def resize(self, size: int) -> None:
        """The driver's truncate (in a thread, after :meth:`truncate_to`'s
        checks): QMPError with QEMU's text when refused."""
        raise QMPError.generic("Image format driver does not support resize")

    # -- queries ------------------------------------------------------------------
    def filename(self) -> str:
        """QEMU's bs->filename (a json: pseudo-protocol for format nodes)."""
        assert self.file is not None
        return self.file.filename()

    def image_info(self) -> dict:
        """ImageInfo for query-named-block-nodes; may fstat (runs in a thread)."""
        return {}

    def encrypted(self) -> bool:
        return False

    def leaf(self) -> "Node":
        """The node at the bottom of the ``file`` chain (the image file)."""
        node = self
        while node.file is not None:
            node = node.file
        return node
