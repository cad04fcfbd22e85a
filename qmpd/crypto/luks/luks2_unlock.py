"""Unlocking a LUKS2 volume key with a passphrase, and the data segment's cipher.

Theory of operation
-------------------
A LUKS2 keyslot (cryptsetup lib/luks2/luks2_keyslot_luks2.c) stores the
volume key the way a LUKS1 slot does, with every parameter in the JSON:

1. *Area key.* The slot's KDF turns the passphrase into ``area.key_size``
   bytes: PBKDF2 (``hash``, ``iterations``, ``salt``) or Argon2i/Argon2id
   (``time``, ``memory`` in KiB, ``cpus`` lanes, ``salt``, version 0x13).
2. *Material.* The area holds the AF-split volume key, ``key_size *
   stripes`` bytes rounded up to whole 512-byte sectors (cryptsetup's
   ``AF_split_sectors(...) * SECTOR_SIZE``), encrypted with
   ``area.encryption`` in 512-byte sectors whose IVs count from 0 at the
   start of the area.
3. *Candidate.* Decrypt, AF-merge (``af.hash``, ``af.stripes``) to
   ``key_size`` bytes.
4. *Check.* The digest bound to the slot holds PBKDF2(``hash``, candidate,
   ``salt``, ``iterations``, len(digest)); equal (constant time) means the
   passphrase is right.

Which slots, in which order (LUKS2_keyslot_open with CRYPT_ANY_SLOT): the
slots whose digest is bound to the data segment, priority 2 ("prefer")
first, then 1 ("normal", also when the field is absent), each group in id
order; priority 0 ("ignore") is tried only when asked for by number. A
wrong passphrase moves on to the next slot; any other failure (an area
cipher this installation cannot run, a truncated area) stops the search
with its own error, as cryptsetup does (it retries only on -EPERM/-ENOENT).

The data segment's sectors are ``sector_size`` bytes, but their IVs count
512-byte units: dm-crypt's ``iv_large_sectors`` is a plain-mode option
that cryptsetup never sets for LUKS2, so sector k of a 4096-byte segment
has IV number 8k plus the segment's ``iv_tweak`` (dm-crypt's iv_offset,
in 512-byte units, mod 2**64). The tests prove it against data that
cryptsetup itself encrypted (offline ``reencrypt --encrypt``, its
userspace path).

Everything here is synchronous and CPU-heavy (KDF, AF-merge): the caller
picks the worker thread. PBKDF2, Argon2 (argon2-cffi's C call) and the
ciphers release the GIL. Every key and intermediate buffer is a bytearray
wiped on every path; the Argon2 call reads the passphrase and writes the
area key in place (no copies the library would free unwiped).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from qmpd.crypto import afsplit, argon2_kdf, ciphers, pbkdf
from qmpd.crypto.ciphers import CipherSpec, SectorCipher
from qmpd.crypto.errors import CryptoError
from qmpd.crypto.luks.keyslot import check_iterations, crypt_material
from qmpd.crypto.luks.luks2_header import Argon2, Keyslot, Luks2Header, Pbkdf2, Segment
from qmpd.crypto.secrets import wipe

SECTOR_SIZE = 512

PRIORITY_IGNORE = 0
PRIORITY_NORMAL = 1
PRIORITY_PREFER = 2

WRONG_PASSPHRASE = "Invalid password, cannot unlock any keyslot"


Reader = Callable[[int, int], bytes]


def data_segment(header: Luks2Header) -> int:
    """The id of the segment the volume's data is in (not a reencryption backup)."""
    for index, segment in header.segments.items():
        if not any(flag.startswith("backup-") for flag in segment.flags):
            return index
    raise CryptoError("LUKS2 metadata has no data segment")


def segment_digest_id(header: Luks2Header, segment: int | None = None) -> int:
    """The id of the digest bound to ``segment`` (default: the data segment)."""
    if segment is None:
        segment = data_segment(header)
    for index, digest in header.digests.items():
        if segment in digest.segments:
            return index
    # read_luks2 refuses a segment without a digest; a hand-made header may not.
    raise CryptoError(f"LUKS2 segment {segment} is not assigned to any digest")


def keyslot_order(header: Luks2Header, keyslot: int | None = None) -> list[int]:
    """The keyslots unlock_luks2 tries, in order (see the module docstring)."""
    digest = header.digests[segment_digest_id(header)]
    bound = [i for i in sorted(header.keyslots) if i in digest.keyslots]
    if keyslot is not None:
        if keyslot not in header.keyslots:
            raise CryptoError(f"LUKS2 keyslot {keyslot} is not active")
        if keyslot not in bound:
            raise CryptoError(f"LUKS2 keyslot {keyslot} does not open the data segment")
        return [keyslot]

    def priority(index: int) -> int:
        value = header.keyslots[index].priority
        return PRIORITY_NORMAL if value is None else value

    return [i for i in bound if priority(i) == PRIORITY_PREFER] + [
        i for i in bound if priority(i) == PRIORITY_NORMAL
    ]


def material_length(slot: Keyslot) -> int:
    """Bytes of encrypted AF material in a slot's area: whole 512-byte sectors."""
    return -(-slot.key_size * slot.af_stripes // SECTOR_SIZE) * SECTOR_SIZE


def _split_encryption(encryption: str, what: str) -> tuple[str, str]:
    """ "aes-xts-plain64" -> ("aes", "xts-plain64")."""
    name, sep, mode = encryption.partition("-")
    if not sep or not name or not mode:
        raise CryptoError(f"{what} encryption {_show(encryption)} is not supported")
    return name, mode


def _show(text: str) -> str:
    text = text.encode("ascii", "backslashreplace").decode("ascii")
    return repr(text[:40] + ("..." if len(text) > 40 else ""))


def _cipher_spec(encryption: str, key_bytes: int, what: str) -> CipherSpec:
    name, mode = _split_encryption(encryption, what)
    try:
        return ciphers.parse_luks_cipher(name, mode, key_bytes)
    except CryptoError as err:
        raise CryptoError(f"{what}: {err}") from None


def derive_area_key(slot: Keyslot, passphrase: bytes | bytearray, index: int) -> bytearray:
    """The slot's KDF over the passphrase: area.key_size bytes, wiped by the caller."""
    kdf = slot.kdf
    length = slot.area.key_size
    if isinstance(kdf, Pbkdf2):
        check_iterations(kdf.iterations, f"LUKS2 keyslot {index}")
        try:
            return pbkdf.pbkdf2(kdf.hash, passphrase, kdf.salt, kdf.iterations, length)
        except CryptoError as err:
            raise CryptoError(f"LUKS2 keyslot {index}: {err}") from None
    assert isinstance(kdf, Argon2)
    return argon2(kdf, passphrase, length, index)


def argon2(kdf: Argon2, passphrase: bytes | bytearray, length: int, index: int) -> bytearray:
    """Argon2i/Argon2id (version 0x13) into a fresh bytearray, no copies made.

    argon2-cffi's hash_secret_raw copies the passphrase into memory it frees
    unwiped and returns bytes; :func:`argon2_kdf.derive_into` over the
    caller's buffers does neither. The C call releases the GIL.
    """
    if kdf.type not in argon2_kdf.TYPES:
        raise CryptoError(f"LUKS2 keyslot {index} kdf type {_show(kdf.type)} is not supported")
    out = bytearray(length)
    try:
        rv = argon2_kdf.derive_into(
            kdf.type, kdf.time, kdf.memory, kdf.cpus, passphrase, bytes(kdf.salt), out
        )
    except BaseException:
        wipe(out)
        raise
    if rv != argon2_kdf.ARGON2_OK:
        wipe(out)
        reason = argon2_kdf.error_message(rv)
        raise CryptoError(f"LUKS2 keyslot {index}: Argon2 failed: {reason}")
    return out


def _read_material(read: Reader, slot: Keyslot, index: int) -> bytes:
    length = material_length(slot)
    data = bytes(read(slot.area.offset, length))
    if len(data) != length:
        raise CryptoError(
            f"Cannot read the key material of LUKS2 keyslot {index}: "
            f"the image ends at {slot.area.offset + len(data)} bytes, "
            f"{slot.area.offset + length} needed"
        )
    return data


def digest_matches(header: Luks2Header, digest_id: int, candidate: bytes | bytearray) -> bool:
    """Whether ``candidate`` is the volume key the digest describes."""
    digest = header.digests[digest_id]
    check_iterations(digest.iterations, f"LUKS2 digest {digest_id}")
    try:
        computed = pbkdf.pbkdf2(
            digest.hash, candidate, digest.salt, digest.iterations, len(digest.digest)
        )
    except CryptoError as err:
        raise CryptoError(f"LUKS2 digest {digest_id}: {err}") from None
    try:
        return hmac.compare_digest(computed, digest.digest)
    finally:
        wipe(computed)


def try_keyslot(
    read: Reader, header: Luks2Header, index: int, passphrase: bytes | bytearray, digest_id: int
) -> bytearray | None:
    """The volume key if ``passphrase`` opens keyslot ``index`` to a key that
    digest ``digest_id`` (the data segment's) accepts, else None."""
    slot = header.keyslots[index]
    spec = _cipher_spec(slot.area.encryption, slot.area.key_size, f"LUKS2 keyslot {index} area")
    material = _read_material(read, slot, index)
    area_key = derive_area_key(slot, passphrase, index)
    split = None
    candidate = None
    try:
        split = crypt_material(spec, area_key, material, encrypt=False)
        candidate = afsplit.af_merge(slot.af_hash, split, slot.key_size, slot.af_stripes)
        if digest_matches(header, digest_id, candidate):
            found, candidate = candidate, None
            return found
        return None
    finally:
        wipe(area_key)
        wipe(split)
        wipe(candidate)


def unlock_luks2(
    read: Reader, header: Luks2Header, passphrase: bytes | bytearray, *, keyslot: int | None = None
) -> tuple[bytearray, int]:
    """(volume key, keyslot id) of the first keyslot ``passphrase`` opens.

    ``read(offset, length)`` as for :func:`read_luks2`. ``keyslot`` tries
    that slot only, even one of priority "ignore". The volume key is the
    caller's to wipe. CPU-heavy: call from a worker thread.
    """
    digest_id = segment_digest_id(header)
    for index in keyslot_order(header, keyslot):
        key = try_keyslot(read, header, index, passphrase, digest_id)
        if key is not None:
            return key, index
    raise CryptoError(WRONG_PASSPHRASE)


def segment_cipher(
    header: Luks2Header, volume_key: bytes | bytearray, segment: int | None = None
) -> SectorCipher:
    """The data segment's sector cipher; ``sector`` counts ``sector_size`` units
    from the start of the segment, IVs count 512-byte units (iv_shift)."""
    index = data_segment(header) if segment is None else segment
    seg: Segment = header.segments[index]
    what = f"LUKS2 segment {index}"
    if seg.integrity is not None:
        raise CryptoError(
            f"{what} uses authenticated encryption (integrity), which is not supported"
        )
    spec = _cipher_spec(seg.encryption, len(volume_key), what)
    shift = (seg.sector_size // SECTOR_SIZE).bit_length() - 1
    return SectorCipher(
        spec, volume_key, sector_size=seg.sector_size, iv_shift=shift, iv_offset=seg.iv_tweak
    )
