"""One key slot: unlock it with a passphrase, or build its key material.

A slot stores the volume key AF-split into 4000 stripes and encrypted, as
512-byte sectors numbered from 0, with the volume's cipher under a key
PBKDF2 derives from the passphrase and the slot's salt. A candidate volume
key is right when PBKDF2 over it with the header's digest salt and
iterations gives the header's 20-byte digest.

Every key and every intermediate buffer is a bytearray wiped before return.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from typing import Callable

from qmpd.crypto import afsplit, pbkdf
from qmpd.crypto.ciphers import CipherSpec, SectorCipher
from qmpd.crypto.errors import CryptoError
from qmpd.crypto.luks.header import (
    DIGEST_LEN,
    SALT_LEN,
    SECTOR_SIZE,
    SLOT_ACTIVE,
    KeySlot,
    LuksHeader,
)
from qmpd.crypto.luks.io import ImageIO
from qmpd.crypto.secrets import wipe  # noqa: F401  (re-exported for the engine)


def read_exact(io: ImageIO, offset: int, length: int, what: str) -> bytes:
    data = io.read(offset, length)
    if len(data) != length:
        raise CryptoError(
            f"Cannot read {what}: the image ends at "
            f"{offset + len(data)} bytes, {offset + length} needed"
        )
    return data


def read_material(io: ImageIO, header: LuksHeader, index: int) -> bytes:
    slot = header.slots[index]
    return read_exact(
        io,
        slot.key_offset * SECTOR_SIZE,
        header.material_length(),
        f"the key material of keyslot {index}",
    )


# OpenSSL's PKCS5_PBKDF2_HMAC takes the count as a C int (cryptography panics
# beyond it); LUKS's field is 32 bits unsigned. No real image comes close:
# 2**31 iterations take minutes.
MAX_PBKDF2_ITERATIONS = 2**31 - 1


def check_iterations(iterations: int, what: str) -> None:
    if iterations > MAX_PBKDF2_ITERATIONS:
        raise CryptoError(
            f"{what} iteration count {iterations} is larger than "
            f"{MAX_PBKDF2_ITERATIONS}, which this PBKDF2 cannot compute"
        )


def volume_key_digest(hash_name: str, header: LuksHeader, volume_key: bytes | bytearray) -> bytes:
    check_iterations(header.mk_digest_iterations, "LUKS key")
    digest = pbkdf.pbkdf2(
        hash_name, volume_key, header.mk_digest_salt, header.mk_digest_iterations, DIGEST_LEN
    )
    try:
        return bytes(digest)
    finally:
        wipe(digest)


def crypt_material(
    spec: CipherSpec, slot_key: bytearray, data: bytes | bytearray, encrypt: bool
) -> bytearray:
    """Key material through the slot cipher, 512-byte sectors from 0 (LUKS1
    and LUKS2 areas alike); the cipher's copy of the key wiped."""
    cipher = SectorCipher(spec, slot_key)
    try:
        out = cipher.encrypt(0, data) if encrypt else cipher.decrypt(0, data)
    finally:
        cipher.wipe()
    return out if isinstance(out, bytearray) else bytearray(out)


def try_slot(
    header: LuksHeader,
    spec: CipherSpec,
    hash_name: str,
    index: int,
    passphrase: bytes | bytearray,
    material: bytes,
) -> bytearray | None:
    """The volume key if ``passphrase`` opens slot ``index``, else None.

    Inactive slots open with nothing (QEMU's load_key returns 0 for them).
    """
    slot = header.slots[index]
    if slot.active != SLOT_ACTIVE:
        return None
    check_iterations(slot.iterations, f"Keyslot {index}")
    slot_key = pbkdf.pbkdf2(hash_name, passphrase, slot.salt, slot.iterations, header.key_bytes)
    split = None
    candidate = None
    try:
        split = crypt_material(spec, slot_key, material, encrypt=False)
        candidate = afsplit.af_merge(hash_name, split, header.key_bytes, slot.stripes)
        if hmac.compare_digest(volume_key_digest(hash_name, header, candidate), header.mk_digest):
            found, candidate = candidate, None
            return found
        return None
    finally:
        wipe(slot_key)
        wipe(split)
        wipe(candidate)


@dataclass
class SlotMaterial:
    """A slot entry and its encrypted key material, ready to be written."""

    entry: KeySlot
    material: bytes  # encrypted AF-split volume key; not secret once encrypted


def build_slot(
    header: LuksHeader,
    spec: CipherSpec,
    hash_name: str,
    index: int,
    passphrase: bytes | bytearray,
    volume_key: bytes | bytearray,
    iterations: int,
    random_bytes: Callable[[int], bytes] = os.urandom,
) -> SlotMaterial:
    """Encrypt ``volume_key`` for slot ``index`` under ``passphrase`` (CPU-heavy)."""
    old = header.slots[index]
    salt = bytes(random_bytes(SALT_LEN))
    slot_key = pbkdf.pbkdf2(hash_name, passphrase, salt, iterations, header.key_bytes)
    split = None
    try:
        split = afsplit.af_split(hash_name, volume_key, old.stripes, random_bytes)
        encrypted = crypt_material(spec, slot_key, split, encrypt=True)
    finally:
        wipe(slot_key)
        wipe(split)
    entry = KeySlot(SLOT_ACTIVE, iterations, salt, old.key_offset, old.stripes)
    return SlotMaterial(entry, bytes(encrypted))
