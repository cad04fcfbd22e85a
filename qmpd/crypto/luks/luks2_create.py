"""Formatting a new LUKS2 volume, with cryptsetup 2.6 luksFormat's layout.

Layout (LUKS2_hdr_get_storage_params with no size options): two 16 KiB
metadata copies, then the keyslots area of 16 MiB - 32 KiB, so the data
segment starts at 16 MiB (the keyslots' end rounded up to 1 MiB). With a
detached header the data segment starts at 0 of its own device and the
header image holds only the metadata and the keyslots area.

Contents: a random volume key; digest 0, PBKDF2 with the volume's hash over
the volume key, iterations for 125 ms (cryptsetup's LUKS_MKD_ITERATIONS_MS,
at least 1000), a 32-byte salt; keyslot 0 as :mod:`.luks2_amend` builds one
(argon2id by default, iter-time 2000 ms), in the first area (offset 32 KiB);
segment 0 of type crypt, "dynamic" size, the chosen sector size, iv_tweak
0; config json_size and keyslots_size; a random UUID; seqid 1.

Order of writes, so that a crash leaves no LUKS header, the old image's
untouched, or the complete new volume -- never metadata without its key
material:

1. zero every place inside the header length where a LUKS binary header
   could be read from (0 and each secondary probe offset), sync: no old
   header there survives (nothing past the header length is written);
2. the keyslots area: keyslot 0's material, random bytes elsewhere (as
   cryptsetup wipes it), zeros up to the data offset, sync;
3. both metadata copies (:mod:`.luks2_write`), synced -- the volume exists.
"""

from __future__ import annotations

import base64
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from qmpd.crypto import hashes, pbkdf
from qmpd.crypto.ciphers import CipherSpec, format_luks_cipher
from qmpd.crypto.errors import CryptoError
from qmpd.crypto.luks.create import DEFAULT_ITER_TIME, LuksCreateOptions
from qmpd.crypto.luks.io import ImageIO
from qmpd.crypto.luks.luks2_amend import (
    KDF_SALT_SIZE,
    Argon2Costs,
    build_keyslot,
    choose_kdf,
    find_area_gap,
)
from qmpd.crypto.luks.luks2_header import (
    BINARY_HEADER_SIZE,
    MAX_KEYSLOTS_SIZE,
    SECONDARY_PROBE_OFFSETS,
    Config,
    Copy,
    CopyState,
    Luks2Header,
)
from qmpd.crypto.luks.luks2_volume import Luks2Volume
from qmpd.crypto.luks.luks2_write import HDR_SALT_SIZE, LABEL_SIZE, plan_metadata_write
from qmpd.crypto.secrets import wipe

HDR_SIZE = 16 * 1024  # LUKS2_HDR_16K_LEN
DEFAULT_KEYSLOTS_SIZE = 16 * 1024 * 1024 - 2 * HDR_SIZE
DATA_ALIGNMENT = 1024 * 1024  # cryptsetup's default alignment
DIGEST_ITER_TIME = 125  # LUKS_MKD_ITERATIONS_MS
SECTOR_SIZES = (512, 4096)


@dataclass
class Luks2CreateOptions:
    """LUKS2 format options; None means cryptsetup 2.6's default."""

    cipher_alg: str = "aes-256"
    cipher_mode: str = "xts"
    ivgen_alg: str | None = None  # plain64
    ivgen_hash_alg: str | None = None  # sha256 with essiv
    hash_alg: str = "sha256"
    iter_time: int = DEFAULT_ITER_TIME
    pbkdf: str | None = None  # argon2id
    pbkdf_memory: int | None = None  # KiB
    pbkdf_parallel: int | None = None
    sector_size: int = 512
    label: str = ""
    detached_header: bool = False
    keyslots_size: int | None = None  # bytes (--luks2-keyslots-size)

    def cipher_spec(self) -> CipherSpec:
        """The data cipher, checked as LUKS1 create checks it."""
        return LuksCreateOptions(
            cipher_alg=self.cipher_alg,
            cipher_mode=self.cipher_mode,
            ivgen_alg=self.ivgen_alg,
            ivgen_hash_alg=self.ivgen_hash_alg,
            hash_alg=self.hash_alg,
            iter_time=self.iter_time,
        ).cipher_spec()

    def encryption(self) -> str:
        name, mode = format_luks_cipher(self.cipher_spec())
        return f"{name}-{mode}"

    def layout(self) -> tuple[int, int]:
        """(keyslots_size, data offset); the offset is 0 with a detached header."""
        keyslots_size = DEFAULT_KEYSLOTS_SIZE if self.keyslots_size is None else self.keyslots_size
        if keyslots_size <= 0 or keyslots_size % 4096 or keyslots_size > MAX_KEYSLOTS_SIZE:
            raise CryptoError(
                f"LUKS2 keyslots area size {keyslots_size} must be a "
                f"positive multiple of 4096 of at most {MAX_KEYSLOTS_SIZE}"
            )
        if self.detached_header:
            return keyslots_size, 0
        end = 2 * HDR_SIZE + keyslots_size
        return keyslots_size, -(-end // DATA_ALIGNMENT) * DATA_ALIGNMENT


def luks2_header_length(options: Luks2CreateOptions) -> int:
    """Bytes before the payload: the data offset, or with a detached header
    the size of the header image (metadata and keyslots area)."""
    keyslots_size, data_offset = options.layout()
    return data_offset if data_offset else 2 * HDR_SIZE + keyslots_size


def _check(options: Luks2CreateOptions) -> tuple[CipherSpec, str]:
    spec = options.cipher_spec()
    hashes.hash_algorithm(options.hash_alg)
    if options.sector_size not in SECTOR_SIZES:
        raise CryptoError(
            f"Unsupported encryption sector size {options.sector_size}, must be 512 or 4096"
        )
    if len(options.label.encode("utf-8")) >= LABEL_SIZE or "\0" in options.label:
        raise CryptoError(f"Label is too long (at most {LABEL_SIZE - 1} bytes)")
    if options.iter_time == 0:
        raise CryptoError("iter-time must be a positive number of milliseconds, not 0")
    return spec, options.encryption()


def create_luks2_volume(
    io: ImageIO,
    passphrase: bytes | bytearray,
    options: Luks2CreateOptions,
    *,
    random_bytes: Callable[[int], bytes] = os.urandom,
    argon2_costs: Argon2Costs | None = None,
    digest_iter_time: int = DIGEST_ITER_TIME,
) -> Luks2Volume:
    """Format ``io`` as LUKS2 with ``passphrase`` in keyslot 0; the open volume.

    Writes exactly :func:`luks2_header_length` bytes and nothing of the
    payload. CPU-heavy (calibration, KDF): call from a worker thread.
    ``digest_iter_time`` (ms) is cryptsetup's 125; 0 gives the minimum of
    1000 iterations, as cryptsetup's ``--pbkdf-force-iterations`` does (tests).
    """
    spec, encryption = _check(options)
    keyslots_size, data_offset = options.layout()
    key_size = spec.key_length()
    hash_name = options.hash_alg
    kdf = choose_kdf(
        options.pbkdf,
        options.iter_time,
        options.pbkdf_memory,
        options.pbkdf_parallel,
        hash_name,
        key_size,
        argon2_costs=argon2_costs,
    )
    digest_iterations = pbkdf.iterations_for_time(hash_name, digest_iter_time, key_size)
    digest_size = hashes.hash_digest_size(hash_name)

    template = Luks2Header(
        seqid=0,
        hdr_size=HDR_SIZE,
        label=options.label,
        subsystem="",
        uuid=str(uuid.UUID(bytes=bytes(random_bytes(16)), version=4)),
        checksum_alg="sha256",
        copy=Copy.PRIMARY,
        other_copy=CopyState.MISSING,
        keyslots={},
        segments={},
        digests={},
        tokens={},
        config=Config(HDR_SIZE - BINARY_HEADER_SIZE, keyslots_size),
        metadata={},
        hdr_salt=bytes(random_bytes(HDR_SALT_SIZE)),
    )
    area = find_area_gap(template, key_size)
    if area is None:
        raise CryptoError("No space for new keyslot.")

    volume_key = bytearray(random_bytes(key_size))
    try:
        digest_salt = bytes(random_bytes(KDF_SALT_SIZE))
        digest = pbkdf.pbkdf2(hash_name, volume_key, digest_salt, digest_iterations, digest_size)
        try:
            digest_b64 = base64.b64encode(bytes(digest)).decode("ascii")
        finally:
            wipe(digest)
        slot = build_keyslot(
            0,
            passphrase,
            volume_key,
            kdf=kdf,
            af_hash=hash_name,
            encryption=encryption,
            area=area,
            random_bytes=random_bytes,
        )
        metadata = {
            "keyslots": {"0": slot.json},
            "tokens": {},
            "segments": {
                "0": {
                    "type": "crypt",
                    "offset": str(data_offset),
                    "size": "dynamic",
                    "iv_tweak": "0",
                    "encryption": encryption,
                    "sector_size": options.sector_size,
                }
            },
            "digests": {
                "0": {
                    "type": "pbkdf2",
                    "keyslots": ["0"],
                    "segments": ["0"],
                    "hash": hash_name,
                    "iterations": digest_iterations,
                    "salt": base64.b64encode(digest_salt).decode("ascii"),
                    "digest": digest_b64,
                }
            },
            "config": {
                "json_size": str(HDR_SIZE - BINARY_HEADER_SIZE),
                "keyslots_size": str(keyslots_size),
            },
        }
        write = plan_metadata_write(
            template,
            metadata,
            other_salt=None,
            seqid=1,
            detached_header=options.detached_header,
            random_bytes=random_bytes,
        )

        keyslots_start = 2 * HDR_SIZE
        keyslots = bytearray(random_bytes(keyslots_size))
        start = slot.offset - keyslots_start
        keyslots[start : start + len(slot.material)] = slot.material
        keyslots_end = keyslots_start + keyslots_size
        for offset in (0, *SECONDARY_PROBE_OFFSETS):
            if offset < keyslots_end:
                io.write(offset, bytes(BINARY_HEADER_SIZE))
        io.sync()
        io.write(keyslots_start, bytes(keyslots))
        if data_offset > keyslots_end:
            io.write(keyslots_end, bytes(data_offset - keyslots_end))
        io.sync()
        for step in write.steps:
            if step is None:
                io.sync()
            else:
                io.write(*step)
        return Luks2Volume(write.header, volume_key, 0, detached_header=options.detached_header)
    except BaseException:
        wipe(volume_key)
        raise
