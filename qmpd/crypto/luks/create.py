"""Formatting a new LUKS1 volume, with qemu-img's defaults and layout.

Layout (QEMU's qcrypto_block_luks_create, which follows cryptsetup): the
592-byte header padded to 4096 bytes, then 8 key-material areas of
key-bytes x 4000 rounded up to 4096 bytes each, then the payload. Slot 0
holds the passphrase; slots 1-7 are inactive with zero salt and iterations.

Order of writes, so that a crash leaves either an image that is clearly not
LUKS or the complete new volume, never a header whose key material is
missing:

1. zero the header area [0, 4096), sync — an old LUKS header, if any, is
   gone before its key material is touched;
2. write the key-material areas (slot 0's material, zeros for the others),
   sync;
3. write the 592-byte header, sync — the volume exists from here on.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from dataclasses import dataclass
from typing import Callable

from qmpd.crypto import ciphers, hashes, pbkdf
from qmpd.crypto.ciphers import CipherSpec
from qmpd.crypto.errors import CryptoError
from qmpd.crypto.luks.header import (
    HEADER_SECTORS,
    KEY_SLOT_OFFSET,
    MAGIC,
    NUM_KEY_SLOTS,
    SALT_LEN,
    SECTOR_SIZE,
    SLOT_INACTIVE,
    STRIPES,
    VERSION,
    KeySlot,
    LuksHeader,
    make_fixed_string,
    make_uuid_field,
    material_sectors,
)
from qmpd.crypto.luks.io import ImageIO
from qmpd.crypto.luks.keyslot import build_slot, volume_key_digest, wipe
from qmpd.crypto.luks.volume import LuksVolume, PassphraseWitness, slot_state_digest

DEFAULT_ITER_TIME = 2000


@dataclass
class LuksCreateOptions:
    """blockdev-create's LUKS options; None means QEMU's default."""

    cipher_alg: str = "aes-256"
    cipher_mode: str = "xts"
    ivgen_alg: str | None = None  # plain64
    ivgen_hash_alg: str | None = None  # sha256 with essiv, else absent
    hash_alg: str = "sha256"
    iter_time: int = DEFAULT_ITER_TIME

    def cipher_spec(self) -> CipherSpec:
        ivgen = self.ivgen_alg or "plain64"
        ivhash = self.ivgen_hash_alg
        if ivgen == "essiv" and ivhash is None:
            ivhash = "sha256"
        spec = CipherSpec(self.cipher_alg, self.cipher_mode, ivgen, ivhash)
        # QEMU's qcrypto_block_luks_create order: the name the header can
        # carry, then ESSIV's cipher, then the payload cipher itself.
        ciphers.format_luks_cipher(spec)
        spec.ivgen_cipher_alg()
        ciphers.check_cipher_supported(spec)
        return spec


def check_iter_time(iter_time: int) -> None:
    """Refuse iter-time 0, which QEMU 7.2 divides by (and crashes).

    Negative values get QEMU's own "too large to scale" text from the
    calibration, as in qemu-img.
    """
    if iter_time == 0:
        raise CryptoError("iter-time must be a positive number of milliseconds, not 0")


def _layout(key_bytes: int) -> tuple[int, int]:
    """(sectors per slot's key material, payload offset in sectors)."""
    per_slot = material_sectors(key_bytes, STRIPES)
    return per_slot, HEADER_SECTORS + NUM_KEY_SLOTS * per_slot


def header_length(options: LuksCreateOptions) -> int:
    """Bytes the header and the 8 key-material areas take (the payload offset)."""
    return _layout(options.cipher_spec().key_length())[1] * SECTOR_SIZE


def create_volume(
    io: ImageIO,
    passphrase: bytes | bytearray,
    options: LuksCreateOptions,
    *,
    payload_in_file: bool = True,
    detached_header: bool = False,
    random_bytes: Callable[[int], bytes] = os.urandom,
) -> LuksVolume:
    """Format ``io`` as LUKS1 with ``passphrase`` in slot 0; returns the open volume.

    ``payload_in_file`` says whether the payload follows the header in the
    same file (raw LUKS); either way this writes exactly the header length
    (:func:`header_length`) and nothing of the payload. ``detached_header``:
    ``io`` is a header image of its own and the header records payload
    offset 0, the start of the other image (QEMU 9.0's
    QCRYPTO_BLOCK_CREATE_DETACHED, cryptsetup's ``--header`` default).
    """
    check_iter_time(options.iter_time)
    spec = options.cipher_spec()
    hash_name = options.hash_alg
    hashes.hash_algorithm(hash_name)
    name, mode = ciphers.format_luks_cipher(spec)
    for text, what in ((name, "Cipher name"), (mode, "Cipher mode"), (hash_name, "Hash name")):
        if len(text.encode()) >= 32:
            raise CryptoError(f"{what} '{text}' is too long for LUKS header")
    key_bytes = spec.key_length()
    per_slot, payload = _layout(key_bytes)
    slot_iterations = pbkdf.iterations_for_time(hash_name, options.iter_time, key_bytes)
    digest_iterations = pbkdf.master_key_digest_iterations(hash_name, options.iter_time)

    volume_key = bytearray(random_bytes(key_bytes))
    try:
        mk_salt = bytes(random_bytes(SALT_LEN))
        uuid_text = str(uuid.UUID(bytes=bytes(random_bytes(16)), version=4))
        slots = tuple(
            KeySlot(SLOT_INACTIVE, 0, bytes(SALT_LEN), HEADER_SECTORS + i * per_slot, STRIPES)
            for i in range(NUM_KEY_SLOTS)
        )
        header = LuksHeader(
            MAGIC,
            VERSION,
            make_fixed_string(name),
            make_fixed_string(mode),
            make_fixed_string(hash_name),
            0 if detached_header else payload,
            key_bytes,
            b"\0" * 20,
            mk_salt,
            digest_iterations,
            make_uuid_field(uuid_text),
            slots,
        )
        header = dataclasses.replace(
            header, mk_digest=volume_key_digest(hash_name, header, volume_key)
        )
        slot0 = build_slot(
            header, spec, hash_name, 0, passphrase, volume_key, slot_iterations, random_bytes
        )
        header = header.with_slot(0, slot0.entry)

        area = bytearray((payload - HEADER_SECTORS) * SECTOR_SIZE)
        area[: len(slot0.material)] = slot0.material
        io.write(0, bytes(KEY_SLOT_OFFSET))
        io.sync()
        io.write(KEY_SLOT_OFFSET, bytes(area))
        io.sync()
        io.write(0, header.pack())
        io.sync()
    except BaseException:
        wipe(volume_key)
        raise
    witness = PassphraseWitness(passphrase, 0, slot_state_digest(header, 0, slot0.material))
    return LuksVolume(
        header,
        spec,
        volume_key,
        witness,
        payload_in_file=payload_in_file,
        detached_header=detached_header,
    )
