"""Writing LUKS2 metadata: both copies, checked before a byte goes out.

Theory of operation
-------------------
An update of LUKS2 metadata is a new JSON object written as two copies
(lib/luks2/luks2_disk_metadata.c, LUKS2_disk_hdr_write / hdr_write_disk).
:func:`plan_metadata_write` turns the header as read plus the new JSON into
the exact bytes of both copies and the ordered writes that put them on the
disk; it does no I/O itself.

What each copy holds (the layout is in :mod:`.luks2_header`):

* ``seqid`` is the old one plus one, the same in both copies; a reader
  takes the copy with the higher seqid, so the copy written first wins as
  soon as it is complete.
* Each copy keeps its own 64-byte ``salt``, as cryptsetup keeps salt1 and
  salt2 apart; a copy that was BAD or MISSING gets a fresh random salt,
  as cryptsetup's recovery gives it ("always regenerate salt for bad
  header"). Every update writes both copies, so such a copy is repaired by
  the next update.
* ``label``, ``subsystem``, ``uuid``, ``checksum_alg`` and ``hdr_size`` are
  carried over; ``hdr_offset`` is 0 and ``hdr_size``.
* The JSON text as json-c prints it for cryptsetup (JSON_C_TO_STRING_PLAIN |
  NOSLASHESCAPE): no whitespace, members in their order, numbers as
  integers, ``/`` unescaped, non-ASCII characters as raw UTF-8; the area
  is NUL-padded to ``json_size`` (``hdr_size - 4096``), and at least one
  NUL must follow the text.
* ``csum``: the checksum algorithm over the binary header with the csum
  field zeroed, then the whole JSON area, padding included.

The order, for the primary and then the secondary copy: the binary header
with the new seqid and a zero csum, the JSON area, the binary header with
its csum, sync. Until the third write of a copy is durable that copy does
not validate (wrong checksum) and the reader takes the other one; the
primary is complete, and wins, before the secondary is touched. So a crash
at any point leaves the old metadata or the new one, never a mix.
cryptsetup writes the JSON area only up to the end of the longest text it
has seen; this writes the whole area, which is never shorter.

Nothing is planned for metadata that would not validate: the two new copies
are read back with :func:`~.luks2_header.read_luks2` first, and any
failure is a :class:`CryptoError` before the caller has written anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qmpd.crypto.errors import CryptoError
from qmpd.crypto.luks.luks2_header import (
    BINARY_HEADER_SIZE,
    CSUM_OFFSET,
    MAGIC_PRIMARY,
    MAGIC_SECONDARY,
    VERSION,
    Copy,
    CopyState,
    Luks2Header,
    read_luks2,
)

HDR_SALT_SIZE = 64
# magic, version, hdr_size, seqid, label, checksum_alg, salt, uuid,
# subsystem, hdr_offset (the reader's layout; padding and csum follow)
_BINARY = struct.Struct(">6sHQQ48s32s64s40s48sQ")
_SALT_OFFSET = 104
LABEL_SIZE = 48
UUID_SIZE = 40
CHECKSUM_ALG_SIZE = 32

#: (offset, data) to write, or None for a sync barrier.
Step = tuple[int, bytes] | None


@dataclass(frozen=True)
class MetadataWrite:
    """Both copies of new metadata and the writes that put them on disk."""

    header: Luks2Header  # the new metadata as read_luks2 reads it
    primary: bytes = field(repr=False)  # hdr_size bytes at 0
    secondary: bytes = field(repr=False)  # hdr_size bytes at hdr_size
    steps: tuple[Step, ...] = field(repr=False)

    def __repr__(self) -> str:
        return f"MetadataWrite(seqid={self.header.seqid}, {len(self.steps)} steps)"


def json_text(metadata: dict[str, Any]) -> bytes:
    """The JSON text exactly as cryptsetup (json-c, plain) writes it."""
    try:
        text = json.dumps(metadata, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise CryptoError(f"LUKS2 metadata cannot be written as JSON: {err}") from None
    return text.encode("utf-8")


def _fixed(text: str, size: int, what: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) >= size or b"\0" in raw:
        raise CryptoError(f"LUKS2 {what} {text[:60]!r} does not fit in {size - 1} bytes")
    return raw


def encode_copy(
    header: Luks2Header, json_area: bytes, copy: Copy, salt: bytes, seqid: int
) -> tuple[bytes, bytes]:
    """(binary header with csum zeroed, the same with its csum) for one copy."""
    if len(salt) != HDR_SALT_SIZE:
        raise CryptoError(f"LUKS2 header salt must be {HDR_SALT_SIZE} bytes")
    magic = MAGIC_PRIMARY if copy is Copy.PRIMARY else MAGIC_SECONDARY
    offset = 0 if copy is Copy.PRIMARY else header.hdr_size
    fields = _BINARY.pack(
        magic,
        VERSION,
        header.hdr_size,
        seqid,
        _fixed(header.label, LABEL_SIZE, "label"),
        _fixed(header.checksum_alg, CHECKSUM_ALG_SIZE, "checksum algorithm"),
        salt,
        _fixed(header.uuid, UUID_SIZE, "UUID"),
        _fixed(header.subsystem, LABEL_SIZE, "subsystem"),
        offset,
    )
    unsummed = fields + bytes(BINARY_HEADER_SIZE - len(fields))
    hasher = hashlib.new(header.checksum_alg)
    hasher.update(unsummed)
    hasher.update(json_area)
    csum = hasher.digest()
    summed = unsummed[:CSUM_OFFSET] + csum + unsummed[CSUM_OFFSET + len(csum) :]
    return unsummed, summed


def other_copy_salt(header: Luks2Header, read: Callable[[int, int], bytes]) -> bytes | None:
    """The salt of the copy ``header`` was not read from, if that copy is sound."""
    if header.other_copy not in (CopyState.CURRENT, CopyState.STALE):
        return None
    offset = header.hdr_size if header.copy is Copy.PRIMARY else 0
    raw = bytes(read(offset + _SALT_OFFSET, HDR_SALT_SIZE))
    return raw if len(raw) == HDR_SALT_SIZE else None


def plan_metadata_write(
    header: Luks2Header,
    metadata: dict[str, Any],
    *,
    other_salt: bytes | None,
    detached_header: bool = False,
    seqid: int | None = None,
    random_bytes: Callable[[int], bytes] = os.urandom,
) -> MetadataWrite:
    """Both copies of ``metadata`` over ``header``'s binary fields, and their writes.

    ``other_salt``: the salt of the copy ``header`` was not read from
    (:func:`other_copy_salt`), None for a fresh one. ``seqid`` defaults to
    ``header.seqid + 1``. Raises CryptoError, planning nothing, when the
    result would not validate.
    """
    new_seqid = header.seqid + 1 if seqid is None else seqid
    text = json_text(metadata)
    json_size = header.hdr_size - BINARY_HEADER_SIZE
    if len(text) > json_size - 1:
        raise CryptoError(
            f"LUKS2 metadata of {len(text)} bytes does not fit in the {json_size}-byte JSON area"
        )
    json_area = text + bytes(json_size - len(text))
    own_salt = bytes(header.hdr_salt)
    if len(own_salt) != HDR_SALT_SIZE:
        own_salt = bytes(random_bytes(HDR_SALT_SIZE))
    if other_salt is None or len(other_salt) != HDR_SALT_SIZE:
        other_salt = bytes(random_bytes(HDR_SALT_SIZE))
    if header.copy is Copy.PRIMARY:
        salts = {Copy.PRIMARY: own_salt, Copy.SECONDARY: other_salt}
    else:
        salts = {Copy.PRIMARY: other_salt, Copy.SECONDARY: own_salt}

    steps: list[Step] = []
    images = {}
    for copy in (Copy.PRIMARY, Copy.SECONDARY):
        offset = 0 if copy is Copy.PRIMARY else header.hdr_size
        unsummed, summed = encode_copy(header, json_area, copy, salts[copy], new_seqid)
        images[copy] = summed + json_area
        steps += [
            (offset, unsummed),
            (offset + BINARY_HEADER_SIZE, json_area),
            (offset, summed),
            None,
        ]

    image = images[Copy.PRIMARY] + images[Copy.SECONDARY]

    def read(offset: int, length: int) -> bytes:
        return image[offset : offset + length]

    try:
        new_header = read_luks2(read, detached_header=detached_header)
    except CryptoError as err:
        raise CryptoError(f"Refusing to write invalid LUKS2 metadata: {err}") from None
    if (
        new_header.copy is not Copy.PRIMARY
        or new_header.other_copy is not CopyState.CURRENT
        or new_header.seqid != new_seqid
    ):
        raise CryptoError(
            "Refusing to write invalid LUKS2 metadata: the copies do not read back as written"
        )
    return MetadataWrite(new_header, images[Copy.PRIMARY], images[Copy.SECONDARY], tuple(steps))


def apply_steps(
    steps: tuple[Step, ...] | list[Step],
    write: Callable[[int, bytes], None],
    sync: Callable[[], None],
) -> None:
    """Perform writes and syncs in order."""
    for step in steps:
        if step is None:
            sync()
        else:
            write(*step)
