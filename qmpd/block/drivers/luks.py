"""The ``luks`` driver: raw LUKS on a file child, and the key handling it
shares with qcow2's LUKS inside.

:class:`EncryptedNode` holds an unlocked volume (its key wiped on close),
unlocks it without the graph lock, and plans/applies key updates through
the LUKS engine. :class:`LuksNode` adds raw LUKS's data path: the payload
starts at the header's payload offset, each 512-byte sector encrypted with
the guest sector number as its IV (plain64 etc. as the header says).

Raw LUKS also opens LUKS2 images (cryptsetup's default format; QEMU's luks
driver does not): the data segment's offset and cipher, its sector size
(512 to 4096) as the node's request alignment, so that unaligned requests
are bounced through read-modify-write; a "dynamic" segment runs to the end
of the file (whole sectors), a fixed one is that many bytes. Key management
(blockdev-amend) of LUKS2 goes to the LUKS2 engine (keyslots 0..31, the
pbkdf members), with the same two phases as LUKS1.

Permissions as QEMU's block/crypto.c: the luks node asks its file for
consistent read plus whatever its own parents take, and shares what they
share (write and resize included, for backward compatibility). While keys
are written it also writes and shares neither read nor write.

Detached headers (QEMU 9.0's ``header`` option, qmpd's feature
``detached-header``): a second child, ``header``, holds the LUKS header
and keyslots, and ``file`` holds only the payload. The header is read
and amended through the header child (:meth:`EncryptedNode.key_node`);
the payload starts at the offset the header records, on ``file`` (0 for
the headers QEMU 9.0, cryptsetup ``--header`` and qmpd create; QEMU reads
the offset from the header too) and runs to the end of ``file``. LUKS1
headers skip the payload overlap checks then, as QEMU 9.0's
QCRYPTO_BLOCK_OPEN_DETACHED; LUKS2 ones are cryptsetup's ``--header``.
The header child gets the same permissions as ``file`` (QEMU computes
both with one child_perms); the exclusive ones of a key update go to the
child the header is in: ``header`` when there is one. (QEMU 9.0 refreshes
only ``file`` for the update, which leaves the header child without
WRITE: qmpd takes them where the writes go.)

blockdev-create with ``header`` (QEMU 9.0's block_crypto_co_create_luks):
the header node is formatted on its own (LUKS1 payload offset 0; LUKS2
data segment at 0) and sized to the header alone, then ``file``, if
given, is truncated to ``size`` (its contents kept, as QEMU) with the
preallocation asked for.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Callable

import trio

from qmpd.block.datapath import BDRV_MAX_LENGTH, Extent
from qmpd.block.drivers.base import BlockDriver
from qmpd.block.drivers.file import NodeRegionIO, ResizeError
from qmpd.block.node import Node, in_thread
from qmpd.block.permissions import ALL, Perm, PermissionUse
from qmpd.crypto.errors import CryptoError
from qmpd.crypto.luks import (
    DEFAULT_ITER_TIME,
    Luks2CreateOptions,
    LuksAmendOptions,
    LuksCreateOptions,
    apply_amend,
    apply_luks2_amend,
    create_luks2_volume,
    create_volume,
    header_length,
    luks2_header_length,
    open_volume,
    precheck_amend,
    precheck_luks2_amend,
    prepare_amend,
    prepare_luks2_amend,
)
from qmpd.crypto.secrets import wipe
from qmpd.errors import QMPError
from qmpd.qdict import qdict_order

if TYPE_CHECKING:  # pragma: no cover
    from qmpd.block.graph import BlockGraph


INT64_MAX = (1 << 63) - 1


class EncryptedNode(Node):
    """A format node with a LUKS volume inside (raw luks, qcow2 encrypt)."""

    supports_amend = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.volume: Any = None  # LuksVolume while open; close() wipes its key
        self.key_secret: str | None = None
        #: The secret the volume was unlocked with: what an add-key amend
        #: without 'secret' unlocks with (QEMU keeps it in its LUKS state),
        #: even after a qcow2 reopen named another key-secret.
        self.opened_secret: str | None = None
        self.updating_keys = False
        self.key_update_lock = trio.Lock()

    def close(self) -> None:
        if self.volume is not None:
            self.volume.close()
            self.volume = None

    def encrypted(self) -> bool:
        return self.volume is not None

    def key_node(self) -> Node:
        """The child the LUKS header is in: keys are read and written there,
        and it is the child that gets a key update's permissions."""
        assert self.file is not None
        return self.file

    def luks_io(self, file: Node) -> NodeRegionIO:
        """Where the LUKS header lives (in ``file``, the key node): the engine's ImageIO."""
        return NodeRegionIO(file)

    def key_update_perms(self, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        if self.updating_keys:
            perm |= Perm.WRITE
            shared &= ~(Perm.CONSISTENT_READ | Perm.WRITE)
        return perm, shared

    async def unlock(
        self,
        graph: "BlockGraph",
        secret_id: str,
        *,
        payload_in_file: bool,
        luks2: bool = False,
        detached_header: bool = False,
    ) -> None:
        """Open the volume with the secret's passphrase, without the graph lock.

        A header may ask for billions of iterations: that open is slow, but
        no other session's block command may wait for it. The node's name is
        reserved meanwhile and its child already counts it as a parent (so
        it cannot be deleted under us); a cancel abandons the thread.
        """
        from qmpd.block.graph import abandonable

        passphrase = graph.secrets.lookup(secret_id)
        try:
            io = self.luks_io(self.key_node())
            async with graph.unlocked(self.name):
                self.volume = await abandonable(
                    lambda: open_volume(
                        io,
                        passphrase,
                        payload_in_file=payload_in_file,
                        luks2=luks2,
                        detached_header=detached_header,
                    ),
                    lambda volume: volume and volume.close(),
                )
        finally:
            wipe(passphrase)
        self.key_secret = self.opened_secret = secret_id

    # -- amend ---------------------------------------------------------------------
    def is_luks2(self) -> bool:
        return getattr(self.volume, "version", 1) == 2

    def amend_crypto_options(self, options: dict) -> dict | None:
        """The LUKS amend options inside ``options``, None when there is nothing to do."""
        return options

    def amend_check_writable(self) -> None:
        """QEMU's luks asks for WRITE on its file after the job exists."""

    def amend_read_only_error(self) -> QMPError | None:
        """The error of an update that reaches a read-only image, if any."""
        return None

    def amend_options(
        self, graph: "BlockGraph", opts: dict, force: bool
    ) -> tuple[LuksAmendOptions, list[bytearray]]:
        secrets: list[bytearray] = []

        def lazy(secret_id: str | None) -> Callable[[], bytearray] | None:
            """Looked up where QEMU looks it up (see LuksAmendOptions), then wiped."""
            if secret_id is None:
                return None

            def lookup() -> bytearray:
                value = graph.secrets.lookup(secret_id)
                secrets.append(value)
                return value

            return lookup

        amend = LuksAmendOptions(
            state=opts["state"],
            new_secret=lazy(opts.get("new-secret")),
            old_secret=lazy(opts.get("old-secret")),
            keyslot=opts.get("keyslot"),
            iter_time=opts.get("iter-time"),
            secret=lazy(opts.get("secret")),
            force=force,
            pbkdf=opts.get("pbkdf"),
            pbkdf_memory=opts.get("pbkdf-memory"),
            pbkdf_parallel=opts.get("pbkdf-parallel"),
        )
        if amend.state == "active" and amend.secret is None and self.opened_secret:
            amend.opened_secret = lazy(self.opened_secret)
        return amend, secrets

    def precheck_amend(self, amend: LuksAmendOptions) -> None:
        """QEMU's checks before the amend's first read (on the job's own time)."""
        check = precheck_luks2_amend if self.is_luks2() else precheck_amend
        try:
            check(self.volume.header, amend)
        except CryptoError as err:
            raise QMPError.generic(str(err)) from None

    def prepare_amend(self, amend: LuksAmendOptions) -> Any:
        prepare = prepare_luks2_amend if self.is_luks2() else prepare_amend
        return prepare(self.volume, self.luks_io(self.key_node()), amend)

    def apply_amend(self, plan: Any) -> None:
        if self.is_luks2():
            apply_luks2_amend(plan, self.luks_io(self.key_node()))
        else:
            apply_amend(plan, self.luks_io(self.key_node()))

    # -- queries ---------------------------------------------------------------------
    def luks_info(self) -> dict | None:
        return self.volume.info() if self.volume is not None else None


class LuksNode(EncryptedNode):
    driver = "luks"
    inline_block_status = True
    request_alignment = 512
    optional_children = ("header",)

    @property
    def header(self) -> Node | None:
        """The node of a detached header (option ``header``), if any."""
        return self.children.get("header")

    def key_node(self) -> Node:
        return self.header or super().key_node()

    def child_perms(self, child: Node) -> tuple[Perm, Perm]:
        perm, shared = self.parent_perms
        perm |= Perm.CONSISTENT_READ
        if child is not self.key_node():  # the payload of a detached header
            return perm, shared
        return self.key_update_perms(perm, shared)

    async def open_image(self, graph: "BlockGraph") -> None:
        secret_id = self.options.get("key-secret")
        if not secret_id:
            raise QMPError.generic("Parameter 'key-secret' is required for cipher")
        detached = self.header is not None
        await self.unlock(
            graph, secret_id, payload_in_file=True, luks2=True, detached_header=detached
        )
        # The cipher's sector (512 bytes for LUKS1; LUKS2's segment sector size).
        self.request_alignment = self.volume.cipher.sector_size
        file = self.file
        assert file is not None
        if detached:  # (a failure here: the generic open closes the node)
            await in_thread(lambda: self._check_payload_fits(file.size()))
        self._length = await in_thread(lambda: self._payload_length(file.length()))

    def _check_payload_fits(self, file_size: int) -> None:
        """A detached header's payload must lie in ``file`` (the checks the
        engine makes of an attached header's own image, same texts)."""
        offset, size = self._payload(), getattr(self.volume, "payload_size", None)
        if offset > file_size:
            raise QMPError.generic(
                f"LUKS payload offset {offset} is beyond the end of the image ({file_size} bytes)"
            )
        if size is not None and offset + size > file_size:
            raise QMPError.generic(
                f"Device is too small. (LUKS2 requires at least {offset + size} bytes.)"
            )

    def amend_check_writable(self) -> None:
        if self.read_only or self.key_node().leaf().read_only:
            raise QMPError.generic("Block node is read-only")

    # -- the data path ------------------------------------------------------------
    @property
    def inline_reads(self) -> bool:
        return self.file is not None and self.file.inline_reads

    def _payload(self) -> int:
        return self.volume.payload_offset

    def _payload_length(self, file_length: int) -> int:
        """The guest-visible size over a file this long: LUKS1 (QEMU) the rest
        of the file; LUKS2 a fixed segment's size, or a dynamic one's whole
        sectors up to the end of the file (dm-crypt's view)."""
        if not self.is_luks2():
            return max(0, file_length - self._payload())
        if self.volume.payload_size is not None:
            return int(self.volume.payload_size)
        sector = self.volume.sector_size
        return max(0, file_length - self._payload()) // sector * sector

    def _sector(self, offset: int) -> int:
        """The cipher's sector number of a guest offset (aligned requests only)."""
        return offset // self.volume.cipher.sector_size

    #: The guest-visible size, as QEMU's bs->total_sectors: set at open and
    #: by the node's own resize (a resize of the file under it changes nothing).
    _length = 0

    def length(self) -> int:
        return self._length

    def pread(self, offset: int, length: int) -> bytes:
        assert self.file is not None
        if self.unaligned(offset, length):  # from a parent node
            return self._access.pread(offset, length)
        data = self.file.pread(self._payload() + offset, length)
        return self._crypt(self.volume.cipher.decrypt, offset, data)

    def pread_many(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """Many reads, one decryption pass (a burst of NBD reads)."""
        assert self.file is not None
        if len(ranges) < 2 or any(self.unaligned(offset, length) for offset, length in ranges):
            return [self.pread(offset, length) for offset, length in ranges]
        payload = self._payload()
        data = self.file.pread_many([(payload + offset, length) for offset, length in ranges])
        try:
            return self.volume.cipher.decrypt_many(
                [
                    (self._sector(offset), piece)
                    for (offset, _), piece in zip(ranges, data, strict=True)
                ]
            )
        except CryptoError:
            raise OSError(errno.EIO, "sector crypto failed") from None

    def pwrite(
        self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False
    ) -> None:
        assert self.file is not None
        if self.unaligned(offset, len(data)):  # from a parent node
            self._access.pwrite(offset, data, fua=fua)
            return
        self.file.pwrite(
            self._payload() + offset, self._crypt(self.volume.cipher.encrypt, offset, data), fua=fua
        )

    def _crypt(self, fn: Callable[[int, Any], bytes], offset: int, data: Any) -> bytes:
        try:
            return fn(self._sector(offset), data)
        except CryptoError:
            raise OSError(errno.EIO, "sector crypto failed") from None

    def block_status(self, offset: int, length: int) -> list[Extent]:
        return [Extent(length)]  # encrypted zeroes are not zeroes: all data

    def resize(self, size: int) -> None:
        """block/crypto.c: the file is truncated to the payload offset plus
        the size (shrinking too), with the file's own checks and texts."""
        payload = self._payload()
        if self.is_luks2():
            self._check_luks2_resize(size)
        if payload > INT64_MAX - size:
            raise QMPError.generic("The requested file size is too large")
        assert self.file is not None
        self.file.truncate_to(payload + size)
        self._length = self._payload_length(self.file.length())

    def _check_luks2_resize(self, size: int) -> None:
        if self.volume.payload_size is not None:
            raise QMPError.generic(
                "Resizing a LUKS2 image with a fixed segment size is not supported by qmpd yet"
            )
        check_luks2_size(size, self.volume.sector_size)

    # -- queries --------------------------------------------------------------------
    def filename(self) -> str:
        """QEMU's json: filename (key-secret is a strong option), members in
        QDict order; with a detached header that child's options too."""
        inner = {"driver": "file", "filename": self.leaf().filename()}
        if self.header is None:
            return "json:" + json.dumps(
                {"driver": "luks", "file": inner, "key-secret": self.key_secret}
            )
        members: dict[str, Any] = {
            "driver": "luks",
            "key-secret": self.key_secret,
            "file": inner,
            "header": {"driver": "file", "filename": self.header.leaf().filename()},
        }
        return "json:" + json.dumps({key: members[key] for key in qdict_order(tuple(members))})

    def image_info(self) -> dict:
        leaf = self.leaf()
        info = leaf.image_info()
        info.update(
            {
                "filename": self.filename(),
                "format": "luks",
                "virtual-size": self.length() if self.volume else 0,
                "encrypted": True,
            }
        )
        luks = self.luks_info()
        if luks is not None:
            info["format-specific"] = {"type": "luks", "data": luks}
        return info

    def encrypted(self) -> bool:
        return True


# -- blockdev-create driver=luks ----------------------------------------------------------

#: Members of QCryptoBlockCreateOptionsLUKS that only LUKS2 has (qmpd's
#: extension, feature luks2), in schema order.
LUKS2_ONLY = ("pbkdf-memory", "pbkdf-parallel", "sector-size", "label")

CreateOptions = LuksCreateOptions | Luks2CreateOptions


def luks_create_options(
    opts: dict, *, detached_header: bool = False, keyslots_size: int | None = None
) -> CreateOptions:
    """QCryptoBlockCreateOptionsLUKS (dashed keys) to the engine's options:
    LUKS1 (QEMU's, the default) or with ``luks-version`` 2 cryptsetup's LUKS2."""
    version = opts.get("luks-version", 1)
    common = {
        "cipher_alg": opts.get("cipher-alg", "aes-256"),
        "cipher_mode": opts.get("cipher-mode", "xts"),
        "ivgen_alg": opts.get("ivgen-alg"),
        "ivgen_hash_alg": opts.get("ivgen-hash-alg"),
        "hash_alg": opts.get("hash-alg", "sha256"),
        "iter_time": opts.get("iter-time", DEFAULT_ITER_TIME),
    }
    if version == 1:
        given = [member for member in LUKS2_ONLY if member in opts]
        if given:
            raise QMPError.generic(
                f"Parameter '{given[0]}' needs luks-version 2 (LUKS1 has no such field)"
            )
        if opts.get("pbkdf", "pbkdf2") != "pbkdf2":
            raise QMPError.generic("Requested PBKDF type is not supported for LUKS1.")
        return LuksCreateOptions(**common)
    if version != 2:
        raise QMPError.generic(f"Unsupported LUKS version {version} (1 or 2)")
    return Luks2CreateOptions(
        **common,
        pbkdf=opts.get("pbkdf"),
        pbkdf_memory=opts.get("pbkdf-memory"),
        pbkdf_parallel=opts.get("pbkdf-parallel"),
        sector_size=opts.get("sector-size", 512),
        label=opts.get("label", ""),
        detached_header=detached_header,
        keyslots_size=keyslots_size,
    )


def check_luks2_size(size: int, sector_size: int) -> None:
    """A LUKS2 payload is whole sectors of its segment's size (create, resize)."""
    if size % sector_size:
        raise QMPError.generic(
            f"The size of a LUKS2 image must be a multiple of its sector size ({sector_size} bytes)"
        )


def created_header_length(options: CreateOptions) -> int:
    """Bytes the new volume's header takes before the payload (or, detached,
    the header image's size)."""
    if isinstance(options, Luks2CreateOptions):
        return luks2_header_length(options)
    return header_length(options)


def format_volume(
    io: NodeRegionIO,
    passphrase: bytearray,
    options: CreateOptions,
    *,
    payload_in_file: bool = True,
    detached_header: bool = False,
) -> None:
    """Write a new LUKS1 or LUKS2 volume's header (CPU-heavy: a worker thread).
    ``detached_header``: LUKS1 records payload offset 0 (LUKS2 options say it
    themselves, see :func:`luks_create_options`)."""
    try:
        if isinstance(options, Luks2CreateOptions):
            volume: Any = create_luks2_volume(io, passphrase, options)
        else:
            volume = create_volume(
                io,
                passphrase,
                options,
                payload_in_file=payload_in_file,
                detached_header=detached_header,
            )
    except CryptoError as err:
        raise QMPError.generic(str(err)) from None
    volume.close()


CREATE_USE = PermissionUse(
    "a blockdev-create job", "file", Perm.WRITE | Perm.RESIZE, ALL & ~Perm.RESIZE
)


async def create_on_node(graph: "BlockGraph", target: Node, write: Callable[[Node], None]) -> None:
    """Run ``write`` on ``target`` holding a blockdev-create job's permissions."""
    async with graph.lock:
        await graph.refresh(target, [CREATE_USE])
    try:
        await in_thread(write, target)
    finally:
        with trio.CancelScope(shield=True):
            async with graph.lock:
                await graph.release(target)


def lookup_passphrase(graph: "BlockGraph", crypto: dict, prefix: str = "") -> bytearray:
    secret_id = crypto.get("key-secret")
    if not secret_id:
        raise QMPError.generic(f"Parameter '{prefix}key-secret' is required for cipher")
    return graph.secrets.lookup(secret_id)


def check_payload_size(length: int, size: int) -> None:
    """block/crypto.c's create init, the sums: an EFBIG gets QEMU's own text;
    then the limit the truncate of the file checks first (bdrv_co_truncate)."""
    if size > INT64_MAX or length > INT64_MAX - size:
        raise QMPError.generic("The requested file size is too large")
    if length + size > BDRV_MAX_LENGTH:
        raise QMPError.generic(f"offset({length + size}) exceeds maximum({BDRV_MAX_LENGTH})")


def size_for_payload(node: Node, length: int, size: int) -> None:
    """The file sized for header and payload; the file system's EFBIG gets
    the same text as QEMU's sums."""
    check_payload_size(length, size)
    try:
        node.truncate_to(length + size)
    except ResizeError as err:
        if err.errno == errno.EFBIG:
            raise QMPError.generic("The requested file size is too large") from None
        raise


async def create(
    graph: "BlockGraph", options: dict, target: Node | None, *, open_ref: "OpenRef | None" = None
) -> None:
    """blockdev-create driver=luks; ``target`` is the node of ``file``, None
    when a detached ``header`` is given: this opens both then, with
    ``open_ref`` (qmpd.block.create.job_node)."""
    if "header" in options:
        assert open_ref is not None
        await create_detached(graph, options, open_ref)
        return
    assert target is not None
    luks_opts = luks_create_options(options)
    # QAPI 'size' is uint64: QEMU's input visitor takes a negative number as
    # its two's complement (-1 is 2**64 - 1, "too large"), and so do we.
    size = options["size"] & 0xFFFFFFFFFFFFFFFF

    def write(node: Node) -> None:
        """As QEMU: the secret and the cipher first, then the size, then the
        header at 0 (the payload stays unwritten). A size QEMU refuses
        leaves the file as it was."""
        passphrase = lookup_passphrase(graph, options)
        try:
            length = created_header_length(luks_opts)
            check_payload_size(length, size)
            if isinstance(luks_opts, Luks2CreateOptions):
                check_luks2_size(size, luks_opts.sector_size)
            node.truncate(0)
            size_for_payload(node, length, size)
            format_volume(NodeRegionIO(node), passphrase, luks_opts)
            prealloc = options.get("preallocation", "off")
            if prealloc in ("falloc", "full"):  # passed down, as QEMU's truncate
                node.preallocate(length, length + size, prealloc)
            node.flush()
        finally:
            wipe(passphrase)

    await create_on_node(graph, target, write)


#: Opens a BlockdevRef for a create job: ``async with open_ref(graph, ref) as node``.
OpenRef = Callable[["BlockGraph", "str | dict"], AbstractAsyncContextManager[Node]]


async def create_detached(graph: "BlockGraph", options: dict, open_ref: OpenRef) -> None:
    """QEMU 9.0's block_crypto_co_create_luks with ``header``: its checks
    and texts, then the header node formatted on its own (sized to the
    header, payload offset 0), then ``file``, if given, sized for the
    payload. The order is QEMU's: a failure on ``file`` leaves the new
    header written."""
    prealloc = options.get("preallocation", "off")
    if prealloc != "off" and "file" not in options:
        raise QMPError.generic(
            "Parameter 'preallocation' requires 'file' to be specified for formatting LUKS disk"
        )
    luks_opts = luks_create_options(options, detached_header=True)
    size = options["size"] & 0xFFFFFFFFFFFFFFFF
    if isinstance(luks_opts, Luks2CreateOptions):
        check_luks2_size(size, luks_opts.sector_size)

    def write_header(node: Node) -> None:
        passphrase = lookup_passphrase(graph, options)
        try:
            node.truncate(0)
            size_for_payload(node, created_header_length(luks_opts), 0)
            format_volume(NodeRegionIO(node), passphrase, luks_opts, detached_header=True)
            node.flush()
        finally:
            wipe(passphrase)

    async with open_ref(graph, options["header"]) as header:
        await create_on_node(graph, header, write_header)
    if "file" in options:
        async with open_ref(graph, options["file"]) as file:
            await create_on_node(graph, file, lambda node: size_payload(node, size, prealloc))


def size_payload(node: Node, size: int, prealloc: str) -> None:
    """QEMU 9.0's block_crypto_co_format_luks_payload: ``file`` truncated to
    ``size`` exactly, its data kept, with the preallocation passed down.

    Its error texts, quirks included: a size past INT64_MAX fails without a
    message (the job says strerror(EFBIG)); EFBIG from the truncate (the
    block layer's maximum or the file system's) gets the usual "too large"
    text; any other failure loses the file's message, leaving strerror of
    the errno (``metadata`` preallocation, which file-posix refuses, is
    "Operation not supported")."""
    if size > INT64_MAX:
        raise QMPError.generic(os.strerror(errno.EFBIG))
    if size > BDRV_MAX_LENGTH:
        raise QMPError.generic("The requested file size is too large")
    if prealloc == "metadata":
        raise QMPError.generic(os.strerror(errno.ENOTSUP))
    old = node.size()
    try:
        node.truncate_to(size)
    except ResizeError as err:
        if err.errno == errno.EFBIG:
            raise QMPError.generic("The requested file size is too large") from None
        raise QMPError.generic(os.strerror(err.errno or errno.EIO)) from None
    if prealloc in ("falloc", "full"):
        node.preallocate(min(old, size), size, prealloc)
    node.flush()


DRIVER = BlockDriver("luks", node_class=LuksNode, create=create)
