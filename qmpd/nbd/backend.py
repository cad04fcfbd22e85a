"""What the NBD server needs of an export: the seam to the block layer.

qmpd/nbd knows nothing of qmpd.block or qmpd.commands; the exports layer
hands the server objects that fit :class:`NbdExport`. Errors are
``OSError`` with an errno, put on the wire as QEMU's
system_errno_to_nbd_errno() does (EPERM/EROFS, EIO, ENOMEM, ENOSPC/EDQUOT/
EFBIG, EOVERFLOW, ENOTSUP, ESHUTDOWN; anything else is EINVAL).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol


class ExtentLike(Protocol):
    """One run of the disk with one status (qmpd.block.datapath.Extent fits).

    ``data``: not a hole (base:allocation reports NBD_STATE_HOLE when false);
    ``zero``: reads as zeroes (NBD_STATE_ZERO; a structured READ sends such a
    run as a hole chunk); ``allocated``: the export's own node answers for
    the run (qemu:allocation-depth reports depth 1, else 0). Read-only
    properties, so that frozen dataclasses fit.
    """

    @property
    def length(self) -> int: ...

    @property
    def data(self) -> bool: ...

    @property
    def zero(self) -> bool: ...

    @property
    def allocated(self) -> bool: ...


class NbdExport(Protocol):
    """A disk the server offers under a name.

    ``description`` None: no NBD_INFO_DESCRIPTION is sent ("" sends an empty
    one, as QEMU does for ``description=``). ``min_block``: the request
    alignment (QEMU's bl.request_alignment), advertised as the minimum block
    size to clients that ask for block sizes. ``allocation_depth``: offer
    the qemu:allocation-depth meta context. ``size`` must not change while
    the export is served (QEMU takes away the resize permission).
    """

    name: str
    description: str | None
    size: int
    writable: bool
    min_block: int
    allocation_depth: bool

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview: ...

    def read_now(
        self, ranges: Sequence[tuple[int, int]]
    ) -> Sequence[bytes | bytearray | memoryview] | None:
        """The reads done at once, on the server's thread, if none has to wait
        (for the disk, for a lock a thread holds); None: nothing was read,
        :meth:`read` each. A burst in one call lets the export decrypt it in
        one pass. Errors: None (read() then reports them) or OSError."""

    def block_status_now(self, offset: int, length: int) -> Sequence[ExtentLike] | None:
        """:meth:`block_status` at once if it need not wait, else None."""

    async def write(self, offset: int, data: bytes | memoryview, fua: bool) -> None: ...

    async def write_zeroes(
        self, offset: int, length: int, *, may_unmap: bool, fua: bool, fast: bool
    ) -> None:
        """``fast``: raise ENOTSUP unless zeroing is cheaper than writing zeroes."""

    async def trim(self, offset: int, length: int) -> None: ...

    async def flush(self) -> None: ...

    async def cache(self, offset: int, length: int) -> None:
        """Prefetch (NBD_CMD_CACHE); doing nothing is a valid answer."""

    async def block_status(self, offset: int, length: int) -> Sequence[ExtentLike]:
        """Extents from ``offset`` covering at least one byte and at most ``length``."""


#: How the server finds exports: by name (None: no such export) and all of them.
ExportLookup = Callable[[str], "NbdExport | None"]
ExportList = Callable[[], "Sequence[NbdExport]"]
