"""qcow2 metadata: the header, its extensions, and new images.

This daemon touches only what key management needs: it validates every
header field a hostile image controls (in QEMU's order, with QEMU's texts,
see qcow2_do_open), finds the LUKS header through the full-disk-encryption
extension, and writes new images. Guest data clusters are never read or
written here.

Layout of a new image (the same as qemu-img 7.2 for images up to a few
terabytes; larger ones get more refcount clusters in the same order):
cluster 0 header + extensions (FDE pointer, feature name table, end),
then the refcount table, the refcount blocks, the L1 table and, when
encrypted, the LUKS header clusters.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Callable

from qmpd.block.datapath import BDRV_MAX_LENGTH
from qmpd.errors import QMPError

MAGIC = 0x514649FB
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
HEADER_V2_LENGTH = 72
HEADER_V3_LENGTH = 104  # without the compression type byte
HEADER_LENGTH = 112  # what QEMU writes: + compression type, padded

CRYPT_NONE, CRYPT_AES, CRYPT_LUKS = 0, 1, 2

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_CRYPTO_HEADER = 0x0537BE77
EXT_BITMAPS = 0x23852875
EXT_DATA_FILE = 0x44415441

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_MASK = 0x1F
COMPAT_LAZY_REFCOUNTS = 1 << 0

FEATURE_INCOMPAT, FEATURE_COMPAT, FEATURE_AUTOCLEAR = 0, 1, 2
#: The feature name table QEMU 7.2 writes, in its order.
FEATURE_TABLE: tuple[tuple[int, int, str], ...] = (
    (FEATURE_INCOMPAT, 0, "dirty bit"),
    (FEATURE_INCOMPAT, 1, "corrupt bit"),
    (FEATURE_INCOMPAT, 2, "external data file"),
    (FEATURE_INCOMPAT, 3, "compression type"),
    (FEATURE_INCOMPAT, 4, "extended L2 entries"),
    (FEATURE_COMPAT, 0, "lazy refcounts"),
    (FEATURE_AUTOCLEAR, 0, "bitmaps"),
    (FEATURE_AUTOCLEAR, 1, "raw external data"),
)

#: qemu-img 7.2 leaves the feature table out of v2 images and of images
#: with clusters under 8 KiB (measured: 4096 has none, 8192 has it).
FEATURE_TABLE_MIN_CLUSTER = 8192

MAX_REFTABLE_BYTES = 8 << 20
MAX_L1_BYTES = 32 << 20
SNAPSHOT_HEADER_SIZE = 40
MAX_SNAPSHOTS = 65536
INT64_MAX = (1 << 63) - 1
INT_MAX = (1 << 31) - 1

_HEADER = struct.Struct(">IIQIIQIIQQIIQ")  # the 72 bytes of version 2
_HEADER_V3 = struct.Struct(">QQQII")  # bytes 72..104
_EXT = struct.Struct(">II")
_FDE = struct.Struct(">QQ")


def _fail(text: str) -> QMPError:
    return QMPError.generic(text)


@dataclass(frozen=True)
class Qcow2Header:
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = HEADER_V2_LENGTH
    compression_type: int = 0

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order


@dataclass
class Qcow2Metadata:
    """What an open qcow2 node knows about its image."""

    header: Qcow2Header
    crypto_header: tuple[int, int] | None = None  # (offset, length) of the LUKS header
    backing_format: str | None = None
    data_file: str | None = None
    backing_file: str | None = None
    bitmaps: int = 0
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)
    unknown_extensions: list[int] = field(default_factory=list)


def parse_header(raw: bytes) -> Qcow2Header:
    """Decode and check the fixed header (the first up to 112 bytes)."""
    if len(raw) < _HEADER.size:
        if len(raw) >= 4 and struct.unpack(">I", raw[:4])[0] == MAGIC:
            raise _fail("Could not read qcow2 header: Input/output error")
        raise _fail("Image is not in qcow2 format")
    (
        magic,
        version,
        backing_off,
        backing_size,
        cluster_bits,
        size,
        crypt,
        l1_size,
        l1_off,
        rt_off,
        rt_clusters,
        nb_snap,
        snap_off,
    ) = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise _fail("Image is not in qcow2 format")
    if version < 2 or version > 3:
        raise _fail(f"Unsupported qcow2 version {version}")
    if cluster_bits < MIN_CLUSTER_BITS or cluster_bits > MAX_CLUSTER_BITS:
        raise _fail(f"Unsupported cluster size: 2^{cluster_bits}")
    cluster_size = 1 << cluster_bits
    if version == 2:
        incompat = compat = autoclear = 0
        refcount_order, header_length = 4, HEADER_V2_LENGTH
    else:
        if len(raw) < HEADER_V3_LENGTH:
            raise _fail("qcow2 header too short")
        incompat, compat, autoclear, refcount_order, header_length = _HEADER_V3.unpack_from(
            raw, _HEADER.size
        )
        if header_length < HEADER_V3_LENGTH:
            raise _fail("qcow2 header too short")
    if header_length > cluster_size:
        raise _fail("qcow2 header exceeds cluster size")
    if backing_off > cluster_size:
        raise _fail("Invalid backing file offset")
    compression = (
        raw[HEADER_V3_LENGTH]
        if header_length > HEADER_V3_LENGTH and len(raw) > HEADER_V3_LENGTH
        else 0
    )
    return Qcow2Header(
        version,
        backing_off,
        backing_size,
        cluster_bits,
        size,
        crypt,
        l1_size,
        l1_off,
        rt_off,
        rt_clusters,
        nb_snap,
        snap_off,
        incompat,
        compat,
        autoclear,
        refcount_order,
        header_length,
        compression,
    )


def _validate_table(
    header: Qcow2Header, offset: int, entries: int, entry_len: int, max_bytes: int, name: str
) -> None:
    if entries > max_bytes // entry_len:
        raise _fail(f"{name} too large")
    if INT64_MAX - entries * entry_len < offset or offset % header.cluster_size:
        raise _fail(f"{name} offset invalid")


def validate_header(
    header: Qcow2Header,
    *,
    read_write: bool,
    feature_names: dict[tuple[int, int], str] | None = None,
) -> None:
    """The checks of qcow2_do_open after the fixed fields, in its order."""
    if header.compression_type not in (0, 1):
        raise _fail(f"qcow2: unknown compression type: {header.compression_type}")
    if header.compression_type == 0 and header.incompatible_features & INCOMPAT_COMPRESSION:
        raise _fail("qcow2: Compression type incompatible feature bit must not be set")
    if header.compression_type != 0 and not header.incompatible_features & INCOMPAT_COMPRESSION:
        raise _fail("qcow2: Compression type incompatible feature bit must be set")
    unknown = header.incompatible_features & ~INCOMPAT_MASK
    if unknown:
        names = []
        for bit in range(64):
            name = (feature_names or {}).get((FEATURE_INCOMPAT, bit))
            if unknown & (1 << bit) and name:
                names.append(name[:46])
                unknown &= ~(1 << bit)
        if unknown:
            names.append(f"Unknown incompatible feature: {unknown:x}")
        raise _fail("Unsupported qcow2 feature(s): " + ", ".join(names))
    if header.incompatible_features & INCOMPAT_CORRUPT and read_write:
        raise _fail("qcow2: Image is corrupt; cannot be opened read/write")
    extended_l2 = bool(header.incompatible_features & INCOMPAT_EXTL2)
    if extended_l2 and header.cluster_size // 32 < (1 << MIN_CLUSTER_BITS):
        raise _fail(f"Unsupported subcluster size: {header.cluster_size // 32}")
    if header.refcount_order > 6:
        raise _fail("Reference count entry width too large; may not exceed 64 bits")
    if header.crypt_method == CRYPT_AES:
        raise _fail(
            "Use of AES-CBC encrypted qcow2 images is no longer supported in system emulators"
        )
    if header.crypt_method not in (CRYPT_NONE, CRYPT_LUKS):
        raise _fail(f"Unsupported encryption method {header.crypt_method}")
    if header.refcount_table_clusters == 0:
        raise _fail("Image does not contain a reference count table")
    _validate_table(
        header,
        header.refcount_table_offset,
        header.refcount_table_clusters,
        header.cluster_size,
        MAX_REFTABLE_BYTES,
        "Reference count table",
    )
    _validate_table(
        header,
        header.snapshots_offset,
        header.nb_snapshots,
        SNAPSHOT_HEADER_SIZE,
        SNAPSHOT_HEADER_SIZE * MAX_SNAPSHOTS,
        "Snapshot table",
    )
    _validate_table(
        header, header.l1_table_offset, header.l1_size, 8, MAX_L1_BYTES, "Active L1 table"
    )
    l2_entries = header.cluster_size // (16 if extended_l2 else 8)
    span = header.cluster_size * l2_entries
    l1_needed = -(-header.size // span)
    if l1_needed > INT_MAX:
        raise _fail("Image is too big")
    if header.l1_size < l1_needed:
        raise _fail("L1 table is too small")


def parse_extensions(header: Qcow2Header, cluster0: bytes, meta: Qcow2Metadata) -> None:
    """Walk the header extensions between the header and ``ext_end``.

    ``cluster0`` holds at least the first ``ext_end`` bytes of the file
    (zero padded past its end, as QEMU's reads are).
    """
    end = header.backing_file_offset or header.cluster_size
    offset = header.header_length
    while offset < end:
        if offset + _EXT.size > len(cluster0):
            raise _fail("Header extension too large")
        magic, length = _EXT.unpack_from(cluster0, offset)
        offset += _EXT.size
        if offset > end or length > end - offset:
            raise _fail("Header extension too large")
        data = cluster0[offset : offset + length]
        if magic == EXT_END:
            return
        if magic == EXT_BACKING_FORMAT:
            if length >= 16:
                raise _fail(f"ERROR: ext_backing_format: len={length} too large (>=16)")
            meta.backing_format = data.decode("utf-8", "replace")
        elif magic == EXT_FEATURE_TABLE:
            for i in range(length // 48):
                entry = data[i * 48 : (i + 1) * 48]
                name = entry[2:].split(b"\0", 1)[0].decode("utf-8", "replace")
                meta.feature_names[(entry[0], entry[1])] = name
        elif magic == EXT_CRYPTO_HEADER:
            if header.crypt_method != CRYPT_LUKS:
                raise _fail("CRYPTO header extension only expected with LUKS encryption method")
            if length != _FDE.size:
                raise _fail(f"CRYPTO header extension size {length}, but expected size {_FDE.size}")
            fde_offset, fde_length = _FDE.unpack(data)
            if fde_offset % header.cluster_size:
                raise _fail(
                    f"Encryption header offset '{fde_offset}' is not a multiple "
                    f"of cluster size '{header.cluster_size}'"
                )
            meta.crypto_header = (fde_offset, fde_length)
        elif magic == EXT_BITMAPS:
            if length != 24:
                raise _fail("bitmaps_ext: Invalid extension length")
            meta.bitmaps = struct.unpack(">I", data[:4])[0]
        elif magic == EXT_DATA_FILE:
            meta.data_file = data.decode("utf-8", "replace")
        else:
            meta.unknown_extensions.append(magic)
        offset += (length + 7) & ~7


def read_metadata(
    read: Callable[[int, int], bytes], file_size: int, *, read_write: bool
) -> Qcow2Metadata:
    """Parse and validate a qcow2 image through ``read(offset, length)``.

    Refuses what this daemon cannot honour: legacy AES, external data files,
    backing files (with a text naming the backing file).
    """
    raw = read(0, HEADER_LENGTH)
    header = parse_header(raw)
    cluster0 = read(0, header.cluster_size)
    cluster0 += bytes(header.cluster_size - len(cluster0))
    meta = Qcow2Metadata(header)
    if header.incompatible_features & ~INCOMPAT_MASK:
        try:
            parse_extensions(header, cluster0, meta)
        except QMPError:
            pass
    validate_header(header, read_write=read_write, feature_names=meta.feature_names)
    meta.feature_names.clear()
    parse_extensions(header, cluster0, meta)
    if header.incompatible_features & INCOMPAT_DATA_FILE or meta.data_file is not None:
        raise _fail("qcow2 images with an external data file are not supported by qmpd")
    if header.crypt_method == CRYPT_LUKS:
        if meta.crypto_header is None:
            raise _fail(f"Missing CRYPTO header for crypt method {header.crypt_method}")
        fde_offset, fde_length = meta.crypto_header
        if fde_length == 0 or fde_offset + fde_length > file_size:
            raise _fail("Encryption header lies outside of the image file")
    if header.backing_file_offset:
        length = header.backing_file_size
        if length > min(1023, header.cluster_size - header.backing_file_offset):
            raise _fail("Backing file name too long")
        meta.backing_file = cluster0[
            header.backing_file_offset : header.backing_file_offset + length
        ].decode("utf-8", "replace")
        raise _fail(
            f"qcow2 images with a backing file are not supported by qmpd "
            f"(backing file '{meta.backing_file}')"
        )
    return meta


def format_specific_info(meta: Qcow2Metadata) -> dict:
    """ImageInfoSpecificQCow2 as QEMU 7.2 reports it (without ``encrypt``)."""
    h = meta.header
    if h.version == 2:
        data: dict = {"compat": "0.10", "refcount-bits": h.refcount_bits}
    else:
        data = {
            "compat": "1.1",
            "lazy-refcounts": bool(h.compatible_features & COMPAT_LAZY_REFCOUNTS),
            "refcount-bits": h.refcount_bits,
            "corrupt": bool(h.incompatible_features & INCOMPAT_CORRUPT),
            "extended-l2": bool(h.incompatible_features & INCOMPAT_EXTL2),
        }
    data["compression-type"] = "zstd" if h.compression_type == 1 else "zlib"
    return data


# -- creation ------------------------------------------------------------------


@dataclass(frozen=True)
class Qcow2CreateLayout:
    """Where each part of a new image goes (cluster indexes)."""

    cluster_size: int
    refcount_order: int
    reftable_cluster: int
    reftable_clusters: int
    refblock_cluster: int
    refblocks: int
    l1_cluster: int
    l1_size: int
    l1_clusters: int
    crypto_cluster: int
    crypto_clusters: int

    @property
    def total_clusters(self) -> int:
        return self.crypto_cluster + self.crypto_clusters

    @property
    def file_length(self) -> int:
        """Where the file ends: after the crypto header, else after the L1 entries."""
        if self.crypto_clusters:
            return self.total_clusters * self.cluster_size
        return self.l1_cluster * self.cluster_size + self.l1_size * 8


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def check_create_options(
    size: int, cluster_size: int, refcount_bits: int, version: str, lazy_refcounts: bool
) -> None:
    """qcow2_co_create's checks, with its texts."""
    if size % 512:
        raise _fail("Image size must be a multiple of 512 bytes")
    if (
        cluster_size & (cluster_size - 1)
        or cluster_size < (1 << MIN_CLUSTER_BITS)
        or cluster_size > (1 << MAX_CLUSTER_BITS)
    ):
        raise _fail(
            f"Cluster size must be a power of two between {1 << MIN_CLUSTER_BITS} "
            f"and {1 << (MAX_CLUSTER_BITS - 10)}k"
        )
    if refcount_bits > 64 or refcount_bits < 1 or refcount_bits & (refcount_bits - 1):
        raise _fail("Refcount width must be a power of two and may not exceed 64 bits")
    if version == "v2" and refcount_bits != 16:
        raise _fail(
            "Different refcount widths than 16 bits require compatibility level 1.1 "
            "or above (use version=v3 or greater)"
        )
    if version == "v2" and lazy_refcounts:
        raise _fail(
            "Lazy refcounts only supported with compatibility level 1.1 and above "
            "(use version=v3 or greater)"
        )


def check_create_size(size: int, cluster_size: int) -> None:
    """The resize that gives QEMU's new image its size (qcow2_co_create's
    blk_truncate: bdrv_co_truncate's checks, then qcow2_grow_l1_table's
    cap of 32 MiB of L1 table), before anything is written."""
    prefix = "Could not resize image: "
    if size > INT64_MAX:  # a uint64 QEMU passes on as a negative int64
        raise _fail(prefix + "Image size cannot be negative")
    if size > BDRV_MAX_LENGTH:
        raise _fail(prefix + f"offset({size}) exceeds maximum({BDRV_MAX_LENGTH})")
    if _ceil_div(size, cluster_size * (cluster_size // 8)) > MAX_L1_BYTES // 8:
        raise _fail(prefix + "Failed to grow the L1 table: File too large")


def plan_layout(
    size: int, cluster_size: int, refcount_bits: int, crypto_length: int = 0
) -> Qcow2CreateLayout:
    cluster_bits = cluster_size.bit_length() - 1
    l1_size = _ceil_div(size, cluster_size * (cluster_size // 8))
    # QEMU allocates the L1 table when it grows the new image to its size:
    # an image of size 0 has none (offset 0), and its crypto header comes first.
    l1_clusters = _ceil_div(l1_size * 8, cluster_size)
    crypto_clusters = _ceil_div(crypto_length, cluster_size)
    per_refblock = cluster_size * 8 // refcount_bits
    reftable_clusters, refblocks = 1, 1
    while True:
        total = 1 + reftable_clusters + refblocks + l1_clusters + crypto_clusters
        need_blocks = _ceil_div(total, per_refblock)
        need_table = max(1, _ceil_div(need_blocks * 8, cluster_size))
        if need_blocks == refblocks and need_table == reftable_clusters:
            break
        refblocks, reftable_clusters = need_blocks, need_table
    del cluster_bits
    return Qcow2CreateLayout(
        cluster_size=cluster_size,
        refcount_order=refcount_bits.bit_length() - 1,
        reftable_cluster=1,
        reftable_clusters=reftable_clusters,
        refblock_cluster=1 + reftable_clusters,
        refblocks=refblocks,
        l1_cluster=1 + reftable_clusters + refblocks,
        l1_size=l1_size,
        l1_clusters=l1_clusters,
        crypto_cluster=1 + reftable_clusters + refblocks + l1_clusters,
        crypto_clusters=crypto_clusters,
    )


def _refcount_block_bytes(count: int, refcount_bits: int, cluster_size: int) -> bytes:
    """A refcount block with ``count`` leading entries set to 1.

    Entries under a byte wide are packed least significant bits first, as
    in QEMU's get_refcount_ro0..2; wider ones are big-endian integers.
    """
    block = bytearray(cluster_size)
    if refcount_bits >= 8:
        width = refcount_bits // 8
        one = (1).to_bytes(width, "big")
        for i in range(count):
            block[i * width : (i + 1) * width] = one
    else:
        per_byte = 8 // refcount_bits
        for i in range(count):
            block[i // per_byte] |= 1 << ((i % per_byte) * refcount_bits)
    return bytes(block)


def build_header_cluster(
    layout: Qcow2CreateLayout, size: int, version: str, *, lazy_refcounts: bool, crypto_length: int
) -> bytes:
    """Cluster 0: the header, then FDE pointer, feature table, end marker."""
    v3 = version != "v2"
    cluster_bits = layout.cluster_size.bit_length() - 1
    crypt = CRYPT_LUKS if crypto_length else CRYPT_NONE
    out = bytearray(layout.cluster_size)
    _HEADER.pack_into(
        out,
        0,
        MAGIC,
        3 if v3 else 2,
        0,
        0,
        cluster_bits,
        size,
        crypt,
        layout.l1_size,
        layout.l1_cluster * layout.cluster_size if layout.l1_size else 0,
        layout.reftable_cluster * layout.cluster_size,
        layout.reftable_clusters,
        0,
        0,
    )
    offset = HEADER_V2_LENGTH
    if v3:
        _HEADER_V3.pack_into(
            out,
            _HEADER.size,
            0,
            COMPAT_LAZY_REFCOUNTS if lazy_refcounts else 0,
            0,
            layout.refcount_order,
            HEADER_LENGTH,
        )
        offset = HEADER_LENGTH
    if crypto_length:
        _EXT.pack_into(out, offset, EXT_CRYPTO_HEADER, _FDE.size)
        _FDE.pack_into(out, offset + 8, layout.crypto_cluster * layout.cluster_size, crypto_length)
        offset += 8 + _FDE.size
    if v3 and layout.cluster_size >= FEATURE_TABLE_MIN_CLUSTER:
        table = b"".join(
            struct.pack(">BB46s", kind, bit, name.encode()) for kind, bit, name in FEATURE_TABLE
        )
        _EXT.pack_into(out, offset, EXT_FEATURE_TABLE, len(table))
        out[offset + 8 : offset + 8 + len(table)] = table
    # the end marker is the zeros that follow
    return bytes(out)


def metadata_writes(
    layout: Qcow2CreateLayout, size: int, version: str, *, lazy_refcounts: bool, crypto_length: int
) -> list[tuple[int, bytes]]:
    """(offset, bytes) for every metadata region but the LUKS header, header last."""
    cs = layout.cluster_size
    writes: list[tuple[int, bytes]] = []
    reftable = bytearray(layout.reftable_clusters * cs)
    for i in range(layout.refblocks):
        struct.pack_into(">Q", reftable, i * 8, (layout.refblock_cluster + i) * cs)
    writes.append((layout.reftable_cluster * cs, bytes(reftable)))
    per_block = cs * 8 // (1 << layout.refcount_order)
    remaining = layout.total_clusters
    for i in range(layout.refblocks):
        count = min(per_block, remaining)
        remaining -= count
        writes.append(
            (
                (layout.refblock_cluster + i) * cs,
                _refcount_block_bytes(count, 1 << layout.refcount_order, cs),
            )
        )
    if layout.l1_size:
        writes.append((layout.l1_cluster * cs, bytes(layout.l1_size * 8)))
    writes.append(
        (
            0,
            build_header_cluster(
                layout, size, version, lazy_refcounts=lazy_refcounts, crypto_length=crypto_length
            ),
        )
    )
    return writes
