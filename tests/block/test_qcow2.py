import struct

import pytest
from hypothesis import given, settings, strategies as st

from qmpd.block.drivers import qcow2_metadata as qcow2
from qmpd.errors import QMPError


def build(size=16 << 20, cluster_size=65536, refcount_bits=16, version="v3", crypto=0,
          lazy=False) -> bytes:
    layout = qcow2.plan_layout(size, cluster_size, refcount_bits, crypto)
    image = bytearray(max(layout.file_length, layout.total_clusters * cluster_size))
    for offset, data in qcow2.metadata_writes(layout, size, version, lazy_refcounts=lazy,
                                              crypto_length=crypto):
        image[offset:offset + len(data)] = data
    return bytes(image)


def read_meta(image: bytes, read_write=True):
    return qcow2.read_metadata(lambda o, n: image[o:o + n], len(image), read_write=read_write)


def test_roundtrip_plain_v3():
    meta = read_meta(build(lazy=True))
    h = meta.header
    assert (h.version, h.cluster_size, h.size, h.refcount_bits) == (3, 65536, 16 << 20, 16)
    assert meta.crypto_header is None
    assert meta.feature_names[(0, 0)] == "dirty bit"
    info = qcow2.format_specific_info(meta)
    assert info == {"compat": "1.1", "lazy-refcounts": True, "refcount-bits": 16,
                    "corrupt": False, "extended-l2": False, "compression-type": "zlib"}


def test_encrypted_layout_matches_qemu_img():
    # qemu-img 7.2, 16M, 64k clusters, LUKS aes-256-xts: FDE at 0x40000, 0x1f9000 long
    meta = read_meta(build(crypto=0x1F9000))
    assert meta.header.crypt_method == qcow2.CRYPT_LUKS
    assert meta.crypto_header == (0x40000, 0x1F9000)
    assert meta.header.l1_table_offset == 0x30000


@pytest.mark.parametrize("crypto, length, crypto_header", [
    (0, 0x30000, None), (0x1F9000, 0x230000, (0x30000, 0x1F9000))])
def test_size_zero_has_no_l1_table_as_qemu_img(crypto, length, crypto_header):
    # qemu-img 7.2 create -f qcow2 [encrypt.format=luks] IMG 0: no L1 cluster
    # (offset 0, size 0), the crypto header right after the refcount block.
    layout = qcow2.plan_layout(0, 65536, 16, crypto)
    assert layout.file_length == length
    meta = read_meta(build(size=0, crypto=crypto))
    assert (meta.header.l1_size, meta.header.l1_table_offset) == (0, 0)
    assert meta.crypto_header == crypto_header


def test_v2_has_no_feature_table():
    meta = read_meta(build(version="v2"))
    assert meta.header.version == 2 and meta.feature_names == {}
    assert qcow2.format_specific_info(meta)["compat"] == "0.10"


def patch(image: bytes, offset: int, fmt: str, value) -> bytes:
    out = bytearray(image)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


@pytest.mark.parametrize("offset,fmt,value,text", [
    (0, ">I", 0x12345678, "Image is not in qcow2 format"),
    (4, ">I", 4, "Unsupported qcow2 version 4"),
    (20, ">I", 22, "Unsupported cluster size: 2^22"),
    (20, ">I", 8, "Unsupported cluster size: 2^8"),
    (32, ">I", 1, "Use of AES-CBC encrypted qcow2 images is no longer supported in system emulators"),
    (32, ">I", 7, "Unsupported encryption method 7"),
    (100, ">I", 50, "qcow2 header too short"),
    (100, ">I", 1 << 20, "qcow2 header exceeds cluster size"),
    (8, ">Q", 1 << 20, "Invalid backing file offset"),
    (96, ">I", 7, "Reference count entry width too large; may not exceed 64 bits"),
    (56, ">I", 0, "Image does not contain a reference count table"),
    (48, ">Q", 0x10001, "Reference count table offset invalid"),
    (40, ">Q", 0x30008, "Active L1 table offset invalid"),
    (36, ">I", 0, "L1 table is too small"),
    (36, ">I", 1 << 30, "Active L1 table too large"),
    (72, ">Q", 1 << 40, "Unsupported qcow2 feature(s): Unknown incompatible feature: 10000000000"),
    (72, ">Q", 1 << 2, "qcow2 images with an external data file are not supported by qmpd"),
    (72, ">Q", 1 << 3, "qcow2: Compression type incompatible feature bit must not be set"),
])
def test_hostile_header_fields_get_qemu_texts(offset, fmt, value, text):
    with pytest.raises(QMPError) as info:
        read_meta(patch(build(), offset, fmt, value))
    assert info.value.desc == text


def test_corrupt_bit_refuses_read_write_only():
    image = patch(build(), 72, ">Q", 1 << 1)
    with pytest.raises(QMPError, match="Image is corrupt; cannot be opened read/write"):
        read_meta(image)
    read_meta(image, read_write=False)


def test_crypto_extension_checks():
    image = build(crypto=0x1F9000)
    # FDE extension right after the 112-byte header: magic, len, offset, length
    with pytest.raises(QMPError, match="is not a multiple of cluster size '65536'"):
        read_meta(patch(image, 112 + 8, ">Q", 0x40001))
    with pytest.raises(QMPError, match="CRYPTO header extension only expected"):
        read_meta(patch(image, 32, ">I", 0))
    with pytest.raises(QMPError, match="CRYPTO header extension size 17"):
        read_meta(patch(image, 116, ">I", 17))
    with pytest.raises(QMPError, match="Header extension too large"):
        read_meta(patch(image, 116, ">I", 1 << 20))
    plain = patch(build(), 32, ">I", 2)
    with pytest.raises(QMPError, match="Missing CRYPTO header for crypt method 2"):
        read_meta(plain)


def test_backing_file_is_refused_with_its_name():
    image = bytearray(build())
    name = b"base.qcow2"
    image[4096:4096 + len(name)] = name
    image = patch(bytes(image), 8, ">Q", 4096)
    image = patch(image, 16, ">I", len(name))
    with pytest.raises(QMPError, match="backing file 'base.qcow2'"):
        read_meta(image)


def test_create_option_checks():
    with pytest.raises(QMPError, match="Image size must be a multiple of 512 bytes"):
        qcow2.check_create_options(1000, 65536, 16, "v3", False)
    with pytest.raises(QMPError, match="between 512 and 2048k"):
        qcow2.check_create_options(1 << 20, 1000, 16, "v3", False)
    with pytest.raises(QMPError, match="Refcount width must be a power of two"):
        qcow2.check_create_options(1 << 20, 65536, 3, "v3", False)
    with pytest.raises(QMPError, match="require compatibility level 1.1"):
        qcow2.check_create_options(1 << 20, 65536, 8, "v2", False)
    with pytest.raises(QMPError, match="Lazy refcounts only supported"):
        qcow2.check_create_options(1 << 20, 65536, 16, "v2", True)


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16, 32, 64])
def test_refcount_blocks_count_every_cluster(bits):
    layout = qcow2.plan_layout(1 << 20, 512, bits, 4096 * 3)
    image = build(1 << 20, 512, bits, crypto=4096 * 3)
    per_block = 512 * 8 // bits
    total = 0
    for b in range(layout.refblocks):
        block = image[(layout.refblock_cluster + b) * 512:(layout.refblock_cluster + b + 1) * 512]
        as_int = int.from_bytes(block, "big")
        for i in range(per_block):
            if bits >= 8:
                value = int.from_bytes(block[i * bits // 8:(i + 1) * bits // 8], "big")
            else:
                value = (block[i * bits // 8] >> ((i % (8 // bits)) * bits)) & ((1 << bits) - 1)
            total += value
        assert as_int >= 0
    assert total == layout.total_clusters


HEADER_PREFIX = build()[:4096]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), max_size=12),
       st.integers(0, 1 << 20))
def test_fuzzed_headers_fail_only_with_qmp_errors(edits, file_size):
    image = bytearray(HEADER_PREFIX)
    for offset, value in edits:
        image[offset] = value
    data = bytes(image)
    try:
        qcow2.read_metadata(lambda o, n: data[o:o + n], file_size, read_write=True)
    except QMPError as err:
        assert err.desc and err.error_class == "GenericError"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_crash(data):
    try:
        qcow2.read_metadata(lambda o, n: data[o:o + n], len(data), read_write=False)
    except QMPError:
        pass
