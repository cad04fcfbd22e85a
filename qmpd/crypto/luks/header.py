"""The LUKS1 on-disk header: 592 bytes, parsed and serialised losslessly.

Layout (cryptsetup's "LUKS1 On-Disk Format Specification", all integers
big-endian)::

    0    magic "LUKS\\xba\\xbe"      6
    6    version (1)                 2
    8    cipher-name                32   NUL-terminated C string
    40   cipher-mode                32   "<mode>-<ivgen>[:<ivhash>]"
    72   hash-spec                  32
    104  payload-offset (sectors)    4
    108  key-bytes                   4
    112  mk-digest                  20
    132  mk-digest-salt             32
    164  mk-digest-iterations        4
    168  uuid                       40
    208  8 key slots of 48 bytes: active, iterations, salt[32],
         key-material-offset (sectors), stripes

The string fields are kept as the raw 32/40 bytes, so that whatever follows
a string's NUL survives a parse/serialise round trip; the ``*_str``
properties give what QEMU sees (the C string up to the first NUL).

Parsing never fails on 592 bytes; :func:`check_header` applies QEMU 7.2's
structural checks, with QEMU's texts, in QEMU's order.
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass

from qmpd.crypto.errors import CryptoError

MAGIC = b"LUKS\xba\xbe"
VERSION = 1
HEADER_SIZE = 592
SECTOR_SIZE = 512
NUM_KEY_SLOTS = 8
STRIPES = 4000
SALT_LEN = 32
DIGEST_LEN = 20
UUID_LEN = 40
STRING_LEN = 32
SLOT_ACTIVE = 0x00AC71F3
SLOT_INACTIVE = 0x0000DEAD
# Key material starts after the first 4096 bytes (the header, padded), and
# each slot's area is a multiple of that alignment, as qemu-img lays it out.
KEY_SLOT_OFFSET = 4096
HEADER_SECTORS = KEY_SLOT_OFFSET // SECTOR_SIZE
MIN_SLOT_ITERATIONS = 1000
MIN_MASTER_KEY_ITERATIONS = 1000

_FIXED = struct.Struct(">6sH32s32s32sII20s32sI40s")
_SLOT = struct.Struct(">II32sII")
SLOTS_OFFSET = _FIXED.size
SLOT_ENTRY_SIZE = _SLOT.size
assert SLOTS_OFFSET == 208 and SLOT_ENTRY_SIZE == 48
assert SLOTS_OFFSET + NUM_KEY_SLOTS * SLOT_ENTRY_SIZE == HEADER_SIZE


def _c_string(raw: bytes) -> str:
    """The C string QEMU reads from a fixed field (bytes before the first NUL)."""
    return raw.split(b"\0", 1)[0].decode("latin-1")


def _fixed_field(text: str, length: int) -> bytes:
    raw = text.encode("ascii")
    if len(raw) >= length:
        raise ValueError(f"{text!r} does not fit a {length}-byte LUKS header field")
    return raw.ljust(length, b"\0")


@dataclass(frozen=True)
class KeySlot:
    active: int
    iterations: int
    salt: bytes
    key_offset: int  # in 512-byte sectors from the header start
    stripes: int

    @property
    def is_active(self) -> bool:
        return self.active == SLOT_ACTIVE

    def pack(self) -> bytes:
        return _SLOT.pack(self.active, self.iterations, self.salt, self.key_offset, self.stripes)

    @classmethod
    def unpack(cls, raw: bytes) -> "KeySlot":
        return cls(*_SLOT.unpack(raw))

    def __repr__(self) -> str:  # the salt is not secret, but it is noise
        state = {SLOT_ACTIVE: "active", SLOT_INACTIVE: "inactive"}.get(
            self.active, hex(self.active)
        )
        return (
            f"KeySlot({state}, iterations={self.iterations}, "
            f"key_offset={self.key_offset}, stripes={self.stripes})"
        )


@dataclass(frozen=True)
class LuksHeader:
    magic: bytes
    version: int
    cipher_name: bytes  # raw 32 bytes
    cipher_mode: bytes  # raw 32 bytes
    hash_spec: bytes  # raw 32 bytes
    payload_offset: int  # sectors
    key_bytes: int
    mk_digest: bytes
    mk_digest_salt: bytes
    mk_digest_iterations: int
    uuid: bytes  # raw 40 bytes
    slots: tuple[KeySlot, ...]

    # -- what QEMU reads from the strings
    @property
    def cipher_name_str(self) -> str:
        return _c_string(self.cipher_name)

    @property
    def cipher_mode_str(self) -> str:
        return _c_string(self.cipher_mode)

    @property
    def hash_spec_str(self) -> str:
        return _c_string(self.hash_spec)

    @property
    def uuid_str(self) -> str:
        return self.uuid.split(b"\0", 1)[0].decode("utf-8", errors="replace")

    @property
    def payload_offset_bytes(self) -> int:
        return self.payload_offset * SECTOR_SIZE

    def material_length(self) -> int:
        """Bytes of AF-split key material per slot (key bytes x stripes)."""
        return self.key_bytes * STRIPES

    def with_slot(self, index: int, slot: KeySlot) -> "LuksHeader":
        slots = list(self.slots)
        slots[index] = slot
        return dataclasses.replace(self, slots=tuple(slots))

    def pack(self) -> bytes:
        return _FIXED.pack(
            self.magic,
            self.version,
            self.cipher_name,
            self.cipher_mode,
            self.hash_spec,
            self.payload_offset,
            self.key_bytes,
            self.mk_digest,
            self.mk_digest_salt,
            self.mk_digest_iterations,
            self.uuid,
        ) + b"".join(slot.pack() for slot in self.slots)

    @classmethod
    def unpack(cls, raw: bytes) -> "LuksHeader":
        if len(raw) != HEADER_SIZE:
            raise ValueError(f"a LUKS header is {HEADER_SIZE} bytes, not {len(raw)}")
        # The fields before ``slots``, as _FIXED lays them out.
        fixed: tuple[bytes, int, bytes, bytes, bytes, int, int, bytes, bytes, int, bytes]
        fixed = _FIXED.unpack_from(raw, 0)
        slots = tuple(
            KeySlot.unpack(raw[slot_entry_offset(i) : slot_entry_offset(i + 1)])
            for i in range(NUM_KEY_SLOTS)
        )
        return cls(*fixed, slots=slots)

    def __repr__(self) -> str:
        return (
            f"LuksHeader({self.cipher_name_str}/{self.cipher_mode_str}/"
            f"{self.hash_spec_str}, key_bytes={self.key_bytes}, "
            f"payload_offset={self.payload_offset}, uuid={self.uuid_str!r}, "
            f"slots={list(self.slots)!r})"
        )


def slot_entry_offset(index: int) -> int:
    """Byte offset of key slot ``index``'s 48-byte entry in the header."""
    return SLOTS_OFFSET + index * SLOT_ENTRY_SIZE


def material_sectors(key_bytes: int, stripes: int) -> int:
    """Sectors a slot's key material occupies, rounded up to 4096 bytes.

    This follows cryptsetup's (and QEMU's) layout rather than the spec's
    formula: sector-aligned, then aligned to the header's 8 sectors.
    """
    sectors = -(-key_bytes * stripes // SECTOR_SIZE)
    return -(-sectors // HEADER_SECTORS) * HEADER_SECTORS


def make_fixed_string(text: str) -> bytes:
    """A 32-byte header string field holding ``text``."""
    return _fixed_field(text, STRING_LEN)


def make_uuid_field(text: str) -> bytes:
    return _fixed_field(text, UUID_LEN)


def check_header(header: LuksHeader, *, detached_header: bool = False) -> None:
    """QEMU 7.2's qcrypto_block_luks_check_header, same order, same texts.

    ``detached_header``: the header is an image of its own (QEMU 9.0's
    QCRYPTO_BLOCK_OPEN_DETACHED), so the two checks that the payload does
    not overlap the header or a keyslot are skipped: a detached header's
    payload offset is where the data starts on the other image (usually 0).

    Integers are compared exactly (QEMU's 32-bit arithmetic can wrap on
    hostile values; ours cannot), so the verdict on every sane header is
    QEMU's and every hostile one is refused.
    """
    if header.magic != MAGIC:
        raise CryptoError("Volume is not in LUKS format")
    if header.version != VERSION:
        raise CryptoError(f"LUKS version {header.version} is not supported")
    for raw, what in (
        (header.cipher_name, "cipher name"),
        (header.cipher_mode, "cipher mode"),
        (header.hash_spec, "hash spec"),
    ):
        if b"\0" not in raw:
            raise CryptoError(f"LUKS header {what} is not NUL terminated")
    if not detached_header and header.payload_offset < HEADER_SECTORS:
        raise CryptoError("LUKS payload is overlapping with the header")
    if header.mk_digest_iterations == 0:
        raise CryptoError("LUKS key iteration count is zero")
    for i, slot in enumerate(header.slots):
        start = slot.key_offset
        length = material_sectors(header.key_bytes, slot.stripes)
        if slot.stripes != STRIPES:
            raise CryptoError(
                f"Keyslot {i} is corrupted (stripes {_c_int(slot.stripes)} != {STRIPES})"
            )
        if slot.active not in (SLOT_ACTIVE, SLOT_INACTIVE):
            raise CryptoError(f"Keyslot {i} state (active/disable) is corrupted")
        if slot.active == SLOT_ACTIVE and slot.iterations == 0:
            raise CryptoError(f"Keyslot {i} iteration count is zero")
        if start < HEADER_SECTORS:
            raise CryptoError(f"Keyslot {i} is overlapping with the LUKS header")
        if not detached_header and start + length > header.payload_offset:
            raise CryptoError(f"Keyslot {i} is overlapping with the encrypted payload")
        for j in range(i + 1, NUM_KEY_SLOTS):
            other = header.slots[j]
            other_start = other.key_offset
            other_length = material_sectors(header.key_bytes, other.stripes)
            if start < other_start + other_length and other_start < start + length:
                raise CryptoError(f"Keyslots {i} and {j} are overlapping in the header")


def _c_int(value: int) -> int:
    """A uint32 printed with %d, as QEMU does."""
    return value - (1 << 32) if value >= 1 << 31 else value
