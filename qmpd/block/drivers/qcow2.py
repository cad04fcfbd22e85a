"""The ``qcow2`` driver: images with or without LUKS inside.

Opening reads and validates the header (qcow2_metadata.py, QEMU's checks
and texts), unlocks the LUKS volume the full-disk-encryption extension
points at, and hands the guest data path to :class:`Qcow2Clusters`
(qcow2_clusters.py: L1/L2 lookups, allocation in a crash-safe order). The
LUKS payload inside qcow2 uses the HOST offset of each sector as its IV.

Permissions as QEMU's default for format drivers: the file child is read
consistently and, when the node is writable, written and grown; nobody
else may write or resize it.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import qmpd.block.drivers.qcow2_metadata as qcow2
from qmpd.block.datapath import Extent, check_request, no_waiting
from qmpd.block.drivers.base import BlockDriver
from qmpd.block.drivers.file import NodeRegionIO
from qmpd.block.drivers.luks import (
    EncryptedNode,
    create_on_node,
    created_header_length,
    format_volume,
    lookup_passphrase,
    luks_create_options,
)
from qmpd.block.drivers.qcow2_clusters import Qcow2Clusters
from qmpd.block.node import INLINE_READ_MAX, Node, in_thread
from qmpd.block.permissions import Perm
from qmpd.crypto.luks import LUKS2_SECTOR_SIZE, Luks2CreateOptions, luks2_area_size
from qmpd.crypto.secrets import wipe
from qmpd.errors import QMPError

if TYPE_CHECKING:  # pragma: no cover
    from qmpd.block.graph import BlockGraph


class Qcow2Node(EncryptedNode):
    driver = "qcow2"
    #: QEMU 7.2's qcow2 mutable_opts: what a reopen may leave out or change.
    reopen_mutable = frozenset(
        {
            "lazy-refcounts",
            "pass-discard-request",
            "pass-discard-snapshot",
            "pass-discard-other",
            "overlap-check",
            "overlap-check.template",
            "overlap-check.main-header",
            "overlap-check.active-l1",
            "overlap-check.active-l2",
            "overlap-check.refcount-table",
            "overlap-check.refcount-block",
            "overlap-check.snapshot-table",
            "overlap-check.inactive-l1",
            "overlap-check.inactive-l2",
            "overlap-check.bitmap-directory",
            "cache-size",
            "l2-cache-size",
            "l2-cache-entry-size",
            "refcount-cache-size",
            "cache-clean-interval",
        }
    )

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.meta: qcow2.Qcow2Metadata | None = None
        self.clusters: Qcow2Clusters | None = None

    def child_perms(self, child: Node) -> tuple[Perm, Perm]:
        perm, shared = self.parent_perms
        perm |= Perm.CONSISTENT_READ
        if not self.read_only:
            perm |= Perm.WRITE | Perm.RESIZE
        shared &= ~(Perm.WRITE | Perm.RESIZE)
        return self.key_update_perms(perm, shared)

    def luks_io(self, file: Node) -> NodeRegionIO:
        assert self.meta is not None and self.meta.crypto_header is not None
        offset, length = self.meta.crypto_header
        return NodeRegionIO(file, offset, length)

    async def open_image(self, graph: "BlockGraph") -> None:
        file = self.file
        assert file is not None
        read_write = not self.read_only
        size = await in_thread(file.size)
        self.meta = meta = await in_thread(
            lambda: qcow2.read_metadata(file.pread, size, read_write=read_write)
        )
        encrypt = self.options.get("encrypt") or {}
        fmt = encrypt.get("format")
        crypt = meta.header.crypt_method
        if crypt == qcow2.CRYPT_NONE and fmt:
            raise QMPError.generic(
                f"No encryption in image header, but options specified format '{fmt}'"
            )
        if crypt == qcow2.CRYPT_LUKS and fmt and fmt != "luks":
            raise QMPError.generic(
                f"Header reported 'luks' encryption format but options specify '{fmt}'"
            )
        if crypt == qcow2.CRYPT_LUKS:
            secret_id = encrypt.get("key-secret")
            if not secret_id:
                raise QMPError.generic("Parameter 'encrypt.key-secret' is required for cipher")
            await self.unlock(graph, secret_id, payload_in_file=False, luks2=True)
            if self.is_luks2() and self.volume.sector_size != LUKS2_SECTOR_SIZE:
                self.close()
                raise QMPError.generic(
                    f"LUKS2 inside qcow2 uses 512-byte sectors only, "
                    f"this image's are {self.volume.sector_size} bytes"
                )
        crypto = self.volume.cipher if self.volume is not None else None
        self.clusters = await in_thread(
            lambda: Qcow2Clusters(file, meta, read_only=not read_write, crypto=crypto)
        )
        self.request_alignment = self.clusters.request_alignment

    def close(self) -> None:
        if self.clusters is not None:
            try:
                self.clusters.close()
            except OSError:
                pass  # the image stays dirty/leaky at worst, as after a crash
            self.clusters = None
        super().close()

    def reopen_changes(self, key: str) -> bool:
        # qcow2's reopen re-reads its encrypt.* options (but may not drop them).
        return key.startswith("encrypt.") or super().reopen_changes(key)

    def reopen_commit(self, options: dict) -> None:
        super().reopen_commit(options)
        secret = (options.get("encrypt") or {}).get("key-secret")
        if secret is not None and self.volume is not None:
            self.key_secret = secret

    # -- amend -----------------------------------------------------------------
    def amend_crypto_options(self, options: dict) -> dict | None:
        opts = options.get("encrypt")
        if opts is None:
            return None
        if self.volume is None:
            raise QMPError.generic("Can't amend encryption options - encryption not present")
        if opts.get("format", "luks") != "luks":
            raise QMPError.generic("Only LUKS encryption options can be amended")
        return opts

    def amend_read_only_error(self) -> QMPError | None:
        if self.leaf().read_only:
            # QEMU's qcow2 header-write callback reports the refused write
            # with this (misworded) text.
            return QMPError.generic("Could not read encryption header: Operation not permitted")
        return None

    # -- the data path ------------------------------------------------------------
    def _engine(self) -> Qcow2Clusters:
        if self.clusters is None:
            raise OSError(errno.EIO, "the image is closed")
        return self.clusters

    def length(self) -> int:
        return self._engine().length()

    def pread(self, offset: int, length: int) -> bytes:
        if self.unaligned(offset, length):  # from a parent node (LUKS inside)
            return self._access.pread(offset, length)
        return self._engine().pread(offset, length)

    def pread_many(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        if any(self.unaligned(offset, length) for offset, length in ranges):
            return [self.pread(offset, length) for offset, length in ranges]
        return self._engine().pread_many(ranges)

    @property
    def inline_reads(self) -> bool:
        """The engine takes its metadata lock only if free and reads L2 tables
        without waiting when asked to (no_waiting), so reads may be tried on
        the event loop."""
        return self.file is not None and self.file.inline_reads

    def block_status_now(self, offset: int, length: int) -> list[Extent] | None:
        """Short ranges from the cached L2 tables, if the lock is free."""
        if length > INLINE_READ_MAX or not self.inline_reads:
            return None
        check_request(offset, length, self.length())
        try:
            with no_waiting():
                return self.block_status(offset, length) if length else []
        except BlockingIOError:
            return None

    def pwrite(self, offset: int, data, *, fua: bool = False) -> None:
        if self.unaligned(offset, len(data)):
            self._access.pwrite(offset, data, fua=fua)
            return
        self._engine().pwrite(offset, data, fua=fua)

    def pwrite_zeroes(
        self,
        offset: int,
        length: int,
        *,
        may_unmap: bool = False,
        fua: bool = False,
        fast: bool = False,
    ) -> None:
        if self.unaligned(offset, length):
            self._access.pwrite_zeroes(offset, length, may_unmap=may_unmap, fua=fua, fast=fast)
            return
        self._engine().pwrite_zeroes(offset, length, may_unmap=may_unmap, fua=fua, fast=fast)

    def pdiscard(self, offset: int, length: int) -> None:
        if self.unaligned(offset, length):
            self._access.pdiscard(offset, length)
            return
        self._engine().pdiscard(offset, length)

    def flush(self) -> None:
        self._engine().flush()

    def block_status(self, offset: int, length: int) -> list[Extent]:
        return self._engine().block_status(offset, length)

    def resize(self, size: int) -> None:
        """qcow2_co_truncate's checks and texts; growing and shrinking (the
        clusters past the new end discarded) are the engine's."""
        if size % 512:
            raise QMPError.generic("The new size must be a multiple of 512")
        assert self.meta is not None
        if self.meta.header.nb_snapshots and self.meta.header.version < 3:
            raise QMPError.generic("Can't resize a v2 image which has snapshots")
        # The engine shares self.meta and replaces its (frozen) header itself.
        try:
            self._engine().resize(size)
        except OSError as err:
            if err.errno != errno.EFBIG:
                raise
            raise QMPError.generic(
                f"Failed to grow the L1 table: {os.strerror(err.errno)}"
            ) from None

    # -- queries -----------------------------------------------------------------
    def filename(self) -> str:
        leaf = self.leaf().filename()
        if not self.key_secret:
            return leaf
        return "json:" + json.dumps(
            {
                "encrypt.key-secret": self.key_secret,
                "driver": "qcow2",
                "file": {"driver": "file", "filename": leaf},
            }
        )

    def image_info(self) -> dict:
        info = self.leaf().image_info()
        assert self.meta is not None
        info.update(
            {
                "filename": self.filename(),
                "format": "qcow2",
                "virtual-size": self.meta.header.size,
                "cluster-size": self.meta.header.cluster_size,
            }
        )
        data = qcow2.format_specific_info(self.meta)
        luks = self.luks_info()
        if luks is not None:
            data["encrypt"] = {"format": "luks", **luks}
        info["format-specific"] = {"type": "qcow2", "data": data}
        if self.meta.header.crypt_method:
            info["encrypted"] = True
        return info

    def encrypted(self) -> bool:
        return bool(self.meta and self.meta.header.crypt_method)


# -- blockdev-create driver=qcow2 ----------------------------------------------------------


def check_create(options: dict) -> None:
    if options.get("backing-file") or options.get("backing-fmt"):
        raise QMPError.generic("qmpd does not create qcow2 images with a backing file")
    if options.get("data-file") or options.get("data-file-raw"):
        raise QMPError.generic("qmpd does not create qcow2 images with an external data file")
    if options.get("extended-l2"):
        raise QMPError.generic("qmpd does not create qcow2 images with extended L2 entries")
    prealloc = options.get("preallocation", "off")
    if prealloc != "off":
        raise QMPError.generic(
            f"qmpd creates qcow2 images with preallocation=off only, not '{prealloc}'"
        )
    encrypt = options.get("encrypt")
    if encrypt is not None and encrypt.get("format") != "luks":
        raise QMPError.generic(
            "Use of AES-CBC encrypted qcow2 images is no longer supported in system emulators"
        )


#: LUKS2 inside qcow2 (qmpd's extension): the header region holds the two
#: metadata copies and a keyslots area for all 32 keyslots of the volume
#: key's size; the data is in the qcow2 clusters, 512-byte sectors with the
#: host offset as IV (as QEMU's LUKS1 in qcow2).
QCOW2_LUKS2_KEYSLOTS = 32


def qcow2_luks_options(crypto: dict) -> Any:
    luks_opts = luks_create_options(crypto, detached_header=True)
    if not isinstance(luks_opts, Luks2CreateOptions):
        return luks_opts
    if luks_opts.sector_size != LUKS2_SECTOR_SIZE:
        raise QMPError.generic("LUKS2 inside qcow2 uses 512-byte sectors only")
    key_size = luks_opts.cipher_spec().key_length()
    luks_opts.keyslots_size = QCOW2_LUKS2_KEYSLOTS * luks2_area_size(key_size)
    return luks_opts


async def create(graph: "BlockGraph", options: dict, target: Node) -> None:
    """Metadata, then the LUKS header, then the header cluster.

    The header cluster goes last, so an interrupted creation leaves a file
    that is not a qcow2 image rather than one that points at garbage.
    """
    check_create(options)
    crypto = options.get("encrypt")
    luks_opts = qcow2_luks_options(crypto) if crypto is not None else None
    size = options["size"]
    version = options.get("version", "v3")
    cluster_size = options.get("cluster-size", 65536)
    refcount_bits = options.get("refcount-bits", 16)
    lazy = bool(options.get("lazy-refcounts", False))

    # QEMU checks the options before its first yield (the job's events come
    # before the command's reply), then takes the file's permissions.
    qcow2.check_create_options(size, cluster_size, refcount_bits, version, lazy)
    if options.get("compression-type", "zlib") == "zstd":
        raise QMPError.generic("qmpd creates qcow2 images with compression-type=zlib only")

    def write(node: Node) -> None:
        """QEMU's order: the size (its resize of the new image), then the
        encryption (secret, cipher). A refused size writes nothing."""
        qcow2.check_create_size(size, cluster_size)
        passphrase = lookup_passphrase(graph, crypto, "encrypt.") if crypto is not None else None
        try:
            write_image(node, passphrase)
        finally:
            wipe(passphrase)

    def write_image(node: Node, passphrase: bytearray | None) -> None:
        crypto_length = created_header_length(luks_opts) if luks_opts is not None else 0
        layout = qcow2.plan_layout(size, cluster_size, refcount_bits, crypto_length)
        writes = qcow2.metadata_writes(
            layout, size, version, lazy_refcounts=lazy, crypto_length=crypto_length
        )
        node.truncate(0)
        for offset, data in writes[:-1]:
            node.pwrite(offset, data)
        if luks_opts is not None:
            assert passphrase is not None
            region = NodeRegionIO(node, layout.crypto_cluster * cluster_size, crypto_length)
            format_volume(region, passphrase, luks_opts, payload_in_file=False)
        node.truncate(layout.file_length)
        node.flush()
        node.pwrite(*writes[-1])
        node.flush()

    await create_on_node(graph, target, write)


DRIVER = BlockDriver("qcow2", node_class=Qcow2Node, create=create)
