"""The ``raw`` format driver: the bytes of its file child, optionally a window.

What qsd users put over a plain image to export it. ``offset`` and ``size``
select a window (QEMU's raw-format.c checks and texts); without them every
request passes straight through. raw has no blockdev-create or amend of
its own in QEMU 7.2, so neither here.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from qmpd.block.datapath import Extent
from qmpd.block.drivers.base import BlockDriver
from qmpd.block.node import Node, in_thread
from qmpd.block.permissions import Perm
from qmpd.errors import QMPError

if TYPE_CHECKING:  # pragma: no cover
    from qmpd.block.graph import BlockGraph

INT64_MAX = (1 << 63) - 1


class RawNode(Node):
    driver = "raw"
    reopen_mutable = frozenset({"offset", "size"})

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.offset = 0
        self.fixed_size: int | None = None  # "size": the window is fixed

    def child_perms(self, child: Node) -> tuple[Perm, Perm]:
        perm, shared = self.parent_perms
        if self.offset or self.fixed_size is not None:
            shared &= ~Perm.RESIZE  # a window must not move under us
        return perm, shared

    @staticmethod
    def check_options(options: dict) -> None:
        """raw_read_options: before the file child is opened (QemuOpts sizes)."""
        for key in ("offset", "size"):
            if options.get(key, 0) < 0:
                raise QMPError.generic(
                    f"Parameter '{key}' expects a non-negative number below 2^64"
                )

    async def open_image(self, graph: "BlockGraph") -> None:
        """raw_apply_options: its checks in its order, with its texts."""
        file = self.file
        assert file is not None
        offset = self.options.get("offset", 0)
        size = self.options.get("size")
        real = await in_thread(file.length)
        if offset > real:
            raise QMPError.generic(
                f"Offset ({offset}) cannot be greater than size of the containing file ({real})"
            )
        if size is not None and real - offset < size:
            raise QMPError.generic(
                f"The sum of offset ({offset}) and size ({size}) has to be smaller or "
                f"equal to the  actual size of the containing file ({real})"
            )
        if size is not None and size % 512:
            raise QMPError.generic("Specified size is not multiple of 512")
        self.offset, self.fixed_size = offset, size
        self.request_alignment = file.request_alignment

    def reopen_commit(self, options: dict) -> None:
        super().reopen_commit(options)
        self.offset, self.fixed_size = options.get("offset", 0), options.get("size")

    # -- the data path: a window of the child ---------------------------------------
    @property
    def inline_reads(self) -> bool:
        return self.file is not None and self.file.inline_reads

    @property
    def inline_block_status(self) -> bool:  # type: ignore[override]
        return self.file is not None and self.file.inline_block_status

    def length(self) -> int:
        """raw_co_getlength (raw has a variable length in QEMU: asked each
        time): what of the file is left after the offset, at most size."""
        assert self.file is not None
        left = max(0, self.file.length() - self.offset)
        return left if self.fixed_size is None else min(self.fixed_size, left)

    def pread(self, offset: int, length: int) -> bytes:
        assert self.file is not None
        return self.file.pread(self.offset + offset, length)

    def pwrite(self, offset: int, data, *, fua: bool = False) -> None:
        assert self.file is not None
        self.file.pwrite(self.offset + offset, data, fua=fua)

    def pwrite_zeroes(
        self,
        offset: int,
        length: int,
        *,
        may_unmap: bool = False,
        fua: bool = False,
        fast: bool = False,
    ) -> None:
        assert self.file is not None
        self.file.pwrite_zeroes(
            self.offset + offset, length, may_unmap=may_unmap, fua=fua, fast=fast
        )

    def pdiscard(self, offset: int, length: int) -> None:
        assert self.file is not None
        self.file.pdiscard(self.offset + offset, length)

    def preallocate(self, start: int, end: int, mode: str) -> None:
        assert self.file is not None
        self.file.preallocate(self.offset + start, self.offset + end, mode)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        assert self.file is not None
        return self.file.block_status(self.offset + offset, length)

    def resize(self, size: int) -> None:
        """raw_co_truncate: only without a fixed size; the file follows."""
        if self.fixed_size is not None:
            raise QMPError.generic("Cannot resize fixed-size raw disks")
        if INT64_MAX - size < self.offset:
            raise QMPError.generic("Disk size too large for the chosen offset")
        assert self.file is not None
        self.file.truncate_to(self.offset + size)

    # -- queries ---------------------------------------------------------------------
    def filename(self) -> str:
        """The file's name, or a json: pseudo-protocol when the raw node has
        options of its own (offset, size), in QEMU's QDict order."""
        if "offset" not in self.options and "size" not in self.options:
            return super().filename()
        out: dict = {}
        if "offset" in self.options:
            out["offset"] = self.offset
        out["driver"] = "raw"
        if "size" in self.options:
            out["size"] = self.fixed_size
        out["file"] = {"driver": "file", "filename": self.leaf().filename()}
        return "json:" + json.dumps(out)

    def image_info(self) -> dict:
        info = self.leaf().image_info()
        info.update({"format": "raw", "virtual-size": self.length(), "filename": self.filename()})
        return info


DRIVER = BlockDriver("raw", node_class=RawNode)
