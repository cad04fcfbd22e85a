"""An open LUKS2 volume: the header, the data segment's cipher, the volume key.

:func:`open_luks2_volume` puts :func:`~.luks2_header.read_luks2`,
:func:`~.luks2_unlock.unlock_luks2` and :func:`~.luks2_unlock.segment_cipher`
together behind the interface the block layer already uses for LUKS1
(:class:`~.volume.LuksVolume`): ``cipher``, ``payload_offset``, ``info()``,
``close()``, ``volume_key``. What differs is said by attributes LUKS1 does
not need: ``version`` (2), ``sector_size`` (the segment's, 512 to 4096:
the unit ``cipher`` counts and the node's request alignment) and
``payload_size`` (bytes, or None for a "dynamic" segment that runs to the
end of the image).

Key management lives in :mod:`.luks2_amend` (its plan's apply hands back
the new header, which :meth:`Luks2Volume.adopt_header` takes). ``witness``
stays None: the LUKS1 shortcut it stands for is not used for LUKS2.

Refused at open, each with its own text: an image whose config names
mandatory requirements (cryptsetup's "Unmet LUKS2 requirements detected."),
a data segment that starts past the end of the image, a fixed-size segment
longer than the image. Reencryption metadata and authenticated segments
are refused by the header reader and :func:`segment_cipher` themselves.

:func:`probe_version` tells the two formats apart from the first bytes:
both start with the magic ``LUKS\\xba\\xbe``, then a big-endian version.
"""

from __future__ import annotations

import struct

from qmpd.crypto.ciphers import CipherSpec
from qmpd.crypto.errors import CryptoError
from qmpd.crypto.luks.io import ImageIO
from qmpd.crypto.luks.luks2_header import (
    MAGIC_PRIMARY,
    Argon2,
    Luks2Header,
    Pbkdf2,
    read_luks2,
)
from qmpd.crypto.luks.luks2_unlock import data_segment, segment_cipher, unlock_luks2
from qmpd.crypto.luks.unlocked import UnlockedVolume
from qmpd.crypto.secrets import wipe

UNMET_REQUIREMENTS = "Unmet LUKS2 requirements detected."
PROBE_LENGTH = 8


def probe_version(first_bytes: bytes) -> int | None:
    """The LUKS version the image's first bytes claim, None if not LUKS at all."""
    if len(first_bytes) < PROBE_LENGTH or first_bytes[: len(MAGIC_PRIMARY)] != MAGIC_PRIMARY:
        return None
    return int(struct.unpack_from(">H", first_bytes, len(MAGIC_PRIMARY))[0])


def _show(names: tuple[str, ...]) -> str:
    shown = []
    for name in names[:8]:
        text = name.encode("ascii", "backslashreplace").decode("ascii")
        shown.append(text[:40] + ("..." if len(text) > 40 else ""))
    return ", ".join(shown) + (", ..." if len(names) > 8 else "")


def check_requirements(header: Luks2Header, action: str = "open this image") -> None:
    """Refuse metadata whose mandatory requirements qmpd does not implement."""
    mandatory = header.config.requirements_mandatory
    if mandatory:
        raise CryptoError(f"{UNMET_REQUIREMENTS[:-1]} ({_show(mandatory)}); qmpd cannot {action}")


class Luks2Volume(UnlockedVolume):
    """An unlocked LUKS2 volume (see the module docstring for the interface)."""

    version = 2
    witness = None  # no key management for LUKS2 yet

    def __init__(
        self,
        header: Luks2Header,
        volume_key: bytearray,
        keyslot: int,
        *,
        detached_header: bool = False,
    ) -> None:
        self.header = header
        self.keyslot = keyslot
        self.detached_header = detached_header
        self.segment_id = data_segment(header)
        segment = header.segments[self.segment_id]
        self.payload_offset = segment.offset
        self.payload_size = segment.size
        self.sector_size = segment.sector_size
        self._volume_key = volume_key
        self.cipher = segment_cipher(header, volume_key, self.segment_id)
        self.spec: CipherSpec = self.cipher.spec
        digest = next(d for d in header.digests.values() if self.segment_id in d.segments)
        self._digest = digest
        self.hash_name = digest.hash

    def adopt_header(self, header: Luks2Header) -> None:
        """Take the metadata a key update wrote (same data segment and digest).

        Refused if the new header describes another volume: a different
        UUID, data segment or volume-key digest would make the cipher and
        key this object holds wrong for it.
        """
        segment_id = data_segment(header)
        digest = next((d for d in header.digests.values() if segment_id in d.segments), None)
        if (
            header.uuid != self.header.uuid
            or segment_id != self.segment_id
            or header.segments[segment_id] != self.header.segments[self.segment_id]
            or digest is None
            or digest.digest != self._digest.digest
            or digest.salt != self._digest.salt
        ):
            raise CryptoError("The new LUKS2 header does not describe this volume")
        self.header = header
        self._digest = digest

    def info(self) -> dict:
        """QCryptoBlockInfoLUKS filled from LUKS2 metadata, plus qmpd's
        documented extension (schema feature ``luks2``).

        QEMU's members: cipher-alg, cipher-mode, ivgen-alg (ivgen-hash-alg)
        of the data segment; hash-alg and master-key-iters of the segment's
        digest (PBKDF2 over the volume key, as LUKS1's mk-digest);
        payload-offset the segment's offset in bytes. ``slots`` lists the
        keyslots that exist, in id order (up to 32, with gaps, so a position
        is not an id): active when it opens the data segment; ``key-offset``
        its area's offset in bytes; ``iters`` for PBKDF2 keyslots only and
        ``stripes`` for active ones. The extension: each slot's ``keyslot``
        id and KDF (``pbkdf``; Argon2's ``pbkdf-time``, ``pbkdf-memory``,
        ``pbkdf-parallel``), and ``luks-version``, ``label`` and the data
        segment's ``sector-size`` after the slots.
        """
        out = self._info_head(self._digest.iterations, self.header.uuid)
        slots = []
        for index in sorted(self.header.keyslots):
            slot = self.header.keyslots[index]
            active = index in self._digest.keyslots
            entry: dict = {"active": active}
            if active:
                if isinstance(slot.kdf, Pbkdf2):
                    entry["iters"] = slot.kdf.iterations
                entry["stripes"] = slot.af_stripes
            entry["key-offset"] = slot.area.offset
            entry["keyslot"] = index
            entry["pbkdf"] = slot.kdf.type
            if isinstance(slot.kdf, Argon2):
                entry.update(
                    {
                        "pbkdf-time": slot.kdf.time,
                        "pbkdf-memory": slot.kdf.memory,
                        "pbkdf-parallel": slot.kdf.cpus,
                    }
                )
            slots.append(entry)
        out["slots"] = slots
        out.update({"luks-version": 2, "label": self.header.label, "sector-size": self.sector_size})
        return out

    def __repr__(self) -> str:
        state = "closed" if not self._volume_key else "open"
        return f"Luks2Volume({state}, keyslot={self.keyslot}, uuid={self.header.uuid!r})"


def read_checked(
    io: ImageIO,
    *,
    payload_in_file: bool = True,
    detached_header: bool = False,
    action: str = "open this image",
) -> Luks2Header:
    """The validated header, with the checks that need no passphrase."""
    header = read_luks2(io.read, detached_header=detached_header)
    check_requirements(header, action)
    if payload_in_file:
        segment = header.segments[data_segment(header)]
        size = io.size()
        if segment.offset > size:
            raise CryptoError(
                f"LUKS payload offset {segment.offset} is beyond the end "
                f"of the image ({size} bytes)"
            )
        if segment.size is not None and segment.offset + segment.size > size:
            raise CryptoError(
                f"Device is too small. (LUKS2 requires at least "
                f"{segment.offset + segment.size} bytes.)"
            )
    return header


def open_luks2_volume(
    io: ImageIO, passphrase: bytes | bytearray, *, detached_header: bool = False
) -> Luks2Volume:
    """Check the header and unlock the volume key. CPU-heavy: a worker thread.

    ``detached_header``: ``io`` holds only the metadata and keyslots (the
    data segment may start at 0 of another device), as cryptsetup's
    ``--header``.
    """
    header = read_checked(io, payload_in_file=not detached_header, detached_header=detached_header)
    key, keyslot = unlock_luks2(io.read, header, passphrase)
    try:
        return Luks2Volume(header, key, keyslot, detached_header=detached_header)
    except BaseException:
        wipe(key)
        raise
