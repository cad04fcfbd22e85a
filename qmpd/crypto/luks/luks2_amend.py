"""Adding and erasing LUKS2 keyslots: QEMU's amend semantics, crash-safe writes.

The same two phases as the LUKS1 engine (:mod:`.amend`), so the block
layer dispatches by version and nothing else changes:

* :func:`precheck_luks2_amend` -- the checks that need no I/O, in QEMU's
  order and with its texts (keyslot ids 0 to 31 here);
* :func:`prepare_luks2_amend` -- every check again on the metadata fresh
  from disk, and all the CPU work (unlock, KDF, AF split, encryption,
  random bytes); it reads, never writes;
* :func:`apply_luks2_amend` -- the plan's writes and syncs in order; it
  refuses to write if either metadata copy changed since the plan was made.

What a LUKS2 keyslot is differs from LUKS1, and so do three rules:

* A keyslot is *active* when the metadata has it. The "only active
  keyslot" protections count the keyslots bound to the data segment's
  digest (the ones that can open the volume): erasing an unbound keyslot
  never loses the data, erasing the last bound one would.
* The new keyslot is written as cryptsetup 2.6's luksAddKey writes one:
  type luks2, the volume key's size, AF luks1 with 4000 stripes and the
  digest's hash, a raw area encrypted with the data segment's cipher and
  key size, placed at the first gap of the keyslots area that holds the AF
  material rounded up to 4096 bytes (LUKS2_find_area_gap), no priority.
  The KDF is argon2id by default, 1 GiB of memory capped at half the
  physical memory, min(4, online CPUs) lanes, all tuned to ``iter-time``
  (QEMU's default 2000 ms); pbkdf2 takes its iterations from the same
  calibration as LUKS1 (at least 1000). The data segment's digest gains the
  slot id. Erasing removes the slot and every reference to it (digests and
  tokens, as cryptsetup does). Everything else in the JSON -- tokens,
  unknown members, member order -- is kept as read.
* Metadata goes through :mod:`.luks2_write`: both copies, seqid + 1, read
  back and validated before the plan exists. A copy that was bad or stale
  is repaired by the write.

Crash safety
============

The invariant is LUKS1's: whatever instant the machine stops at, every
passphrase the operation does not remove still unlocks, and the volume key
is the same. Metadata changes are atomic (the reader takes the newer sound
copy, see :mod:`.luks2_write`), so the order only has to keep metadata and
key material consistent:

add (to a free id)
    1. the key material into a free area no metadata points to, sync;
    2. the metadata with the new keyslot, primary then secondary, each
       synced. Before 2 the area is unused; after, the slot is complete.

add with ``force`` over an existing keyslot
    1. the new material into a *new* free area, sync; 2. the metadata,
    which now points the id at the new area; 3. random bytes over the old
    area, sync. At every instant the id opens with the old passphrase or
    the new one -- never with nothing, unlike LUKS1, which has no spare
    area to stage into.

erase
    1. the metadata without the keyslots; 2. random bytes over each area,
    sync. Material is destroyed only once no copy points to it.

tests/crypto/luks/test_luks2_crash_safety.py runs every operation through
the write-back cache model (lost suffixes of unsynced writes, torn writes,
the Nth operation failing) and checks every disk a crash can leave.
"""

from __future__ import annotations

import base64
import copy
import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qmpd.crypto import afsplit, argon2_calibration, ciphers, pbkdf
from qmpd.crypto.ciphers import CipherSpec
from qmpd.crypto.errors import CryptoError
from qmpd.crypto.luks.amend import (
    ALL_KEYSLOTS_MATCH,
    ERASE_NEEDS_TARGET,
    NO_MATCHING_KEYSLOT,
    PBKDF_TYPES,
    LuksAmendOptions,
    SecretValue,
    already_erased,
    c_int,
    check_add_members,
    check_erase_members,
    not_holding_old_secret,
    only_active_keyslot,
    resolve_secret,
)
from qmpd.crypto.luks.create import DEFAULT_ITER_TIME, check_iter_time
from qmpd.crypto.luks.io import ImageIO
from qmpd.crypto.luks.keyslot import crypt_material
from qmpd.crypto.luks.luks2_header import (
    MAX_KEYSLOTS,
    STRIPES,
    Argon2,
    Keyslot,
    KeyslotArea,
    Luks2Header,
    Pbkdf2,
)
from qmpd.crypto.luks.luks2_unlock import (
    data_segment,
    derive_area_key,
    segment_digest_id,
    try_keyslot,
    unlock_luks2,
)
from qmpd.crypto.luks.luks2_volume import Luks2Volume, check_requirements, read_checked
from qmpd.crypto.luks.luks2_write import (
    Step,
    apply_steps,
    other_copy_salt,
    plan_metadata_write,
)
from qmpd.crypto.secrets import wipe

#: argon2_costs(kind, iter_time_ms, memory_kib, parallel) -> (time, memory_kib)
Argon2Costs = Callable[[str, int, int, int], tuple[int, int]]

DEFAULT_PBKDF = "argon2id"  # cryptsetup 2.6 DEFAULT_LUKS2_PBKDF
DEFAULT_ARGON2_MEMORY = 1024 * 1024  # KiB, DEFAULT_LUKS2_MEMORY_KB
DEFAULT_ARGON2_PARALLEL = 4  # DEFAULT_LUKS2_PARALLEL_THREADS
MAX_ARGON2_MEMORY = 4 * 1024 * 1024  # KiB, cryptsetup's argon2 limit
MAX_ARGON2_PARALLEL = 4
KDF_SALT_SIZE = 32  # LUKS_SALTSIZE
AREA_ALIGN = 4096
SECTOR_SIZE = 512
UPDATE_KEYS = "update keys of this image"
HEADER_CHANGED = "The LUKS header changed on disk since the volume was opened"
NO_SPACE = "No space for new keyslot."


# -- KDF parameters ------------------------------------------------------------


def check_kdf_options(options: LuksAmendOptions) -> None:
    """cryptsetup's checks of a requested KDF, for an amend's options."""
    check_kdf_params(options.pbkdf, options.pbkdf_memory, options.pbkdf_parallel)


def check_kdf_params(pbkdf_type: str | None, memory: int | None, parallel: int | None) -> None:
    """cryptsetup's checks of a requested KDF (verify_pbkdf_params), its texts."""
    kind = pbkdf_type if pbkdf_type is not None else DEFAULT_PBKDF
    if kind not in PBKDF_TYPES:
        raise CryptoError(f"Unknown PBKDF type {kind}.")
    if kind == "pbkdf2":
        if memory is not None or parallel is not None:
            raise CryptoError("PBKDF max memory or parallel threads must not be set with pbkdf2.")
        return
    if memory is not None:
        if memory > MAX_ARGON2_MEMORY:
            raise CryptoError(
                f"Requested maximum PBKDF memory cost is too high "
                f"(maximum is {MAX_ARGON2_MEMORY} kilobytes)."
            )
        if memory <= 0:
            raise CryptoError("Requested maximum PBKDF memory cannot be zero.")
    if parallel is not None:
        if parallel > MAX_ARGON2_PARALLEL:
            raise CryptoError(
                f"Requested maximum PBKDF parallel cost is too high "
                f"(maximum is {MAX_ARGON2_PARALLEL})."
            )
        if parallel <= 0:
            raise CryptoError("Requested PBKDF parallel threads cannot be zero.")


def choose_kdf(
    pbkdf_type: str | None,
    iter_time: int | None,
    memory: int | None,
    parallel: int | None,
    hash_name: str,
    key_size: int,
    *,
    argon2_costs: Argon2Costs | None = None,
    memory_cap_kib: int | None = None,
    cpus: int | None = None,
) -> dict[str, Any]:
    """A new keyslot's "kdf" object, salt not yet in it (calibrates: CPU-heavy).

    None means cryptsetup 2.6's default: argon2id, iter-time 2000 ms,
    1 GiB capped at half the physical memory, min(4, online CPUs) lanes.
    """
    check_kdf_params(pbkdf_type, memory, parallel)
    kind = pbkdf_type if pbkdf_type is not None else DEFAULT_PBKDF
    iter_ms = iter_time if iter_time is not None else DEFAULT_ITER_TIME
    check_iter_time(iter_ms)
    if kind == "pbkdf2":
        iterations = pbkdf.iterations_for_time(hash_name, iter_ms, key_size)
        return {"type": "pbkdf2", "hash": hash_name, "iterations": iterations}
    if iter_ms < 0:
        raise CryptoError(f"iter-time {iter_ms} must be a positive number of milliseconds")
    memory_kib = memory if memory is not None else DEFAULT_ARGON2_MEMORY
    lanes = parallel if parallel is not None else DEFAULT_ARGON2_PARALLEL
    if memory_cap_kib is None:
        memory_cap_kib = argon2_calibration.adjusted_physical_memory_kib()
    memory_kib = min(memory_kib, memory_cap_kib)
    lanes = min(lanes, argon2_calibration.online_cpus() if cpus is None else cpus)
    costs = argon2_costs if argon2_costs is not None else argon2_calibration.argon2_costs
    time_cost, memory_kib = costs(kind, iter_ms, memory_kib, lanes)
    return {"type": kind, "time": int(time_cost), "memory": int(memory_kib), "cpus": lanes}


# -- areas and keyslot JSON ------------------------------------------------------


def area_size(key_size: int) -> int:
    """Bytes cryptsetup allocates for a keyslot's area (AF material, 4 KiB aligned)."""
    return -(-key_size * STRIPES // AREA_ALIGN) * AREA_ALIGN


def find_area_gap(header: Luks2Header, key_size: int) -> tuple[int, int] | None:
    """(offset, size) of the first free gap for a new area, cryptsetup's first fit."""
    length = area_size(key_size)
    offset = header.keyslots_offset
    for area in sorted((slot.area for slot in header.keyslots.values()), key=lambda a: a.offset):
        if offset < area.offset and offset + length <= area.offset:
            break
        offset = max(offset, area.offset + area.size)
    if offset + length > header.keyslots_end:
        return None
    return offset, length


def _encryption_spec(encryption: str, key_size: int, what: str) -> CipherSpec:
    name, sep, mode = encryption.partition("-")
    if not sep or not name or not mode:
        raise CryptoError(f"{what} encryption is not supported")
    try:
        return ciphers.parse_luks_cipher(name, mode, key_size)
    except CryptoError as err:
        raise CryptoError(f"{what}: {err}") from None


def _kdf_value(kdf: dict[str, Any], salt: bytes) -> Pbkdf2 | Argon2:
    if kdf["type"] == "pbkdf2":
        return Pbkdf2(hash=kdf["hash"], iterations=kdf["iterations"], salt=salt)
    return Argon2(
        type=kdf["type"], time=kdf["time"], memory=kdf["memory"], cpus=kdf["cpus"], salt=salt
    )


@dataclass
class NewKeyslot:
    """A keyslot's JSON and its encrypted material (not secret once encrypted)."""

    json: dict[str, Any]
    offset: int
    material: bytes = field(repr=False)


def build_keyslot(
    index: int,
    passphrase: bytes | bytearray,
    volume_key: bytes | bytearray,
    *,
    kdf: dict[str, Any],
    af_hash: str,
    encryption: str,
    area: tuple[int, int],
    random_bytes: Callable[[int], bytes] = os.urandom,
) -> NewKeyslot:
    """Encrypt ``volume_key`` for keyslot ``index`` under ``passphrase`` (CPU-heavy).

    The area key is ``len(volume_key)`` bytes from the KDF; the material is
    the AF split padded to whole 512-byte sectors, encrypted with
    ``encryption`` in 512-byte sectors counted from the area's start.
    """
    key_size = len(volume_key)
    offset, size = area
    spec = _encryption_spec(encryption, key_size, f"LUKS2 keyslot {index} area")
    salt = bytes(random_bytes(KDF_SALT_SIZE))
    slot = Keyslot(
        key_size=key_size,
        area=KeyslotArea(offset=offset, size=size, encryption=encryption, key_size=key_size),
        kdf=_kdf_value(kdf, salt),
        af_stripes=STRIPES,
        af_hash=af_hash,
        priority=None,
    )
    sectors = -(-key_size * STRIPES // SECTOR_SIZE)
    area_key = derive_area_key(slot, passphrase, index)
    split = None
    try:
        split = afsplit.af_split(af_hash, volume_key, STRIPES, random_bytes)
        split.extend(bytes(sectors * SECTOR_SIZE - len(split)))
        material = bytes(crypt_material(spec, area_key, split, encrypt=True))
    finally:
        wipe(area_key)
        wipe(split)
    kdf_json = dict(kdf)
    kdf_json["salt"] = base64.b64encode(salt).decode("ascii")
    json_value = {
        "type": "luks2",
        "key_size": key_size,
        "af": {"type": "luks1", "stripes": STRIPES, "hash": af_hash},
        "area": {
            "type": "raw",
            "offset": str(offset),
            "size": str(size),
            "encryption": encryption,
            "key_size": key_size,
        },
        "kdf": kdf_json,
    }
    return NewKeyslot(json_value, offset, material)


def _bind(metadata: dict[str, Any], index: int, digest_id: int) -> None:
    """Keyslot ``index`` belongs to digest ``digest_id`` only."""
    name = str(index)
    for key, digest in metadata["digests"].items():
        refs = digest.get("keyslots", [])
        if key == str(digest_id):
            if name not in refs:
                refs.append(name)
        elif name in refs:
            refs.remove(name)


def _forget(metadata: dict[str, Any], index: int) -> None:
    """Remove keyslot ``index`` and every reference to it (digests, tokens)."""
    name = str(index)
    del metadata["keyslots"][name]
    for section in ("digests", "tokens"):
        for item in metadata[section].values():
            refs = item.get("keyslots") if isinstance(item, dict) else None
            if isinstance(refs, list) and name in refs:
                refs.remove(name)


# -- the session: one amend's view of the image --------------------------------------


class _Session:
    def __init__(self, volume: Luks2Volume, io: ImageIO) -> None:
        header = read_checked(
            io,
            payload_in_file=not volume.detached_header,
            detached_header=volume.detached_header,
            action=UPDATE_KEYS,
        )
        self.digest_id = segment_digest_id(header)
        old = volume.header
        old_digest = old.digests[segment_digest_id(old)]
        new_digest = header.digests[self.digest_id]
        if (
            header.uuid != old.uuid
            or data_segment(header) != volume.segment_id
            or header.segments[volume.segment_id] != old.segments[volume.segment_id]
            or new_digest.digest != old_digest.digest
            or new_digest.salt != old_digest.salt
        ):
            raise CryptoError(HEADER_CHANGED)
        self.volume = volume
        self.io = io
        self.header = header
        self.raw = io.read(0, 2 * header.hdr_size)
        self.bound = sorted(header.digests[self.digest_id].keyslots)

    def opens(self, passphrase: bytes | bytearray, index: int) -> bool:
        """Whether ``passphrase`` opens keyslot ``index`` to the volume key."""
        if index not in self.bound:
            return False
        key = try_keyslot(self.io.read, self.header, index, passphrase, self.digest_id)
        if key is None:
            return False
        wipe(key)
        return True

    def unlock(self, passphrase: bytes | bytearray) -> None:
        """QEMU's find_key: succeed if any keyslot opens, else its error."""
        key, _ = unlock_luks2(self.io.read, self.header, passphrase)
        try:
            if not hmac.compare_digest(bytes(key), bytes(self.volume.volume_key)):
                raise CryptoError(HEADER_CHANGED)
        finally:
            wipe(key)

    def write_metadata(self, metadata: dict[str, Any], random_bytes: Callable[[int], bytes]):
        return plan_metadata_write(
            self.header,
            metadata,
            other_salt=other_copy_salt(self.header, self.io.read),
            detached_header=self.volume.detached_header,
            random_bytes=random_bytes,
        )


def _bound(header: Luks2Header) -> list[int]:
    return sorted(header.digests[segment_digest_id(header)].keyslots)


# -- checks ----------------------------------------------------------------------


def _check_keyslot_range(value: int, *, unsigned: bool) -> int:
    keyslot = c_int(value)
    if not 0 <= keyslot < MAX_KEYSLOTS:
        shown = keyslot & 0xFFFFFFFF if unsigned else keyslot
        raise CryptoError(
            f"Invalid keyslot {shown} specified, must be between 0 and {MAX_KEYSLOTS - 1}"
        )
    return keyslot


def _check_add(header: Luks2Header, options: LuksAmendOptions) -> tuple[int, SecretValue]:
    check_add_members(options)
    if options.keyslot is not None:
        keyslot = _check_keyslot_range(options.keyslot, unsigned=True)
    else:
        free = [i for i in range(MAX_KEYSLOTS) if i not in header.keyslots]
        if not free:
            raise CryptoError("Can't add a keyslot - all keyslots are in use")
        keyslot = free[0]
    if not options.force and keyslot in header.keyslots:
        raise CryptoError(f"Refusing to overwrite active keyslot {keyslot} - please erase it first")
    check_kdf_options(options)
    unlock_secret = options.secret if options.secret is not None else options.opened_secret
    if unlock_secret is None:
        raise CryptoError("The passphrase to unlock the volume is not available: give 'secret'")
    return keyslot, unlock_secret


def _check_erase_options(options: LuksAmendOptions) -> None:
    check_erase_members(options, ("pbkdf", "pbkdf_memory", "pbkdf_parallel"))


def precheck_luks2_amend(header: Luks2Header, options: LuksAmendOptions) -> None:
    """The checks made before an amend first reads the image, in QEMU's order.

    No I/O: uses the header as last read; :func:`prepare_luks2_amend`
    repeats every check on fresh metadata.
    """
    check_requirements(header, UPDATE_KEYS)
    if options.state == "active":
        resolve_secret(_check_add(header, options)[1])
        return
    if options.state != "inactive":
        raise CryptoError(f"Invalid keyslot state '{options.state}'")
    _check_erase_options(options)
    if options.old_secret is not None:
        resolve_secret(options.old_secret)
    if options.keyslot is not None:
        keyslot = _check_keyslot_range(options.keyslot, unsigned=False)
        if options.old_secret is not None:
            if keyslot not in header.keyslots:
                raise not_holding_old_secret(keyslot)
            return
        if not options.force and keyslot not in header.keyslots:
            raise already_erased(keyslot)
        bound = _bound(header)
        if not options.force and bound == [keyslot]:
            raise only_active_keyslot(keyslot)
    elif options.old_secret is None:
        raise CryptoError(ERASE_NEEDS_TARGET)


# -- plans -------------------------------------------------------------------------


@dataclass
class Luks2AmendPlan:
    """What :func:`apply_luks2_amend` will do: ordered writes and syncs, nothing secret."""

    volume: Luks2Volume
    expected_metadata: bytes = field(repr=False)  # both copies as prepared against
    steps: list[Step] = field(repr=False)
    new_header: Luks2Header = field(repr=False)
    description: str = ""

    def __repr__(self) -> str:
        return f"Luks2AmendPlan({self.description}, {len(self.steps)} steps)"


def prepare_luks2_amend(
    volume: Luks2Volume,
    io: ImageIO,
    options: LuksAmendOptions,
    *,
    random_bytes: Callable[[int], bytes] = os.urandom,
    argon2_costs: Argon2Costs | None = None,
) -> Luks2AmendPlan:
    """Check ``options`` against the image and compute the writes; writes nothing.

    CPU-heavy (unlock, calibration, KDF): call from a worker thread.
    ``argon2_costs`` replaces :func:`qmpd.crypto.argon2_calibration.argon2_costs`
    (tests pass fixed costs).
    """
    session = _Session(volume, io)
    if options.state == "active":
        return _prepare_add(session, options, random_bytes, argon2_costs)
    if options.state == "inactive":
        return _prepare_erase(session, options, random_bytes)
    raise CryptoError(f"Invalid keyslot state '{options.state}'")


def _prepare_add(
    session: _Session,
    options: LuksAmendOptions,
    random_bytes: Callable[[int], bytes],
    argon2_costs: Argon2Costs | None,
) -> Luks2AmendPlan:
    header = session.header
    keyslot, unlock_secret = _check_add(header, options)
    session.unlock(resolve_secret(unlock_secret))
    assert options.new_secret is not None  # _check_add() refused an add without it
    new_secret = resolve_secret(options.new_secret)

    volume_key = session.volume.volume_key
    key_size = len(volume_key)
    segment = header.segments[data_segment(header)]
    hash_name = header.digests[session.digest_id].hash
    area = find_area_gap(header, key_size)
    if area is None:
        raise CryptoError(NO_SPACE)
    kdf = choose_kdf(
        options.pbkdf,
        options.iter_time,
        options.pbkdf_memory,
        options.pbkdf_parallel,
        hash_name,
        key_size,
        argon2_costs=argon2_costs,
    )
    new = build_keyslot(
        keyslot,
        new_secret,
        volume_key,
        kdf=kdf,
        af_hash=hash_name,
        encryption=segment.encryption,
        area=area,
        random_bytes=random_bytes,
    )

    metadata = copy.deepcopy(header.metadata)
    metadata["keyslots"][str(keyslot)] = new.json
    _bind(metadata, keyslot, session.digest_id)
    write = session.write_metadata(metadata, random_bytes)

    steps: list[Step] = [(new.offset, new.material), None]
    steps += write.steps
    old = header.keyslots.get(keyslot)
    if old is not None:
        steps += [(old.area.offset, bytes(random_bytes(old.area.size))), None]
    return Luks2AmendPlan(
        session.volume, session.raw, steps, write.header, f"add keyslot {keyslot}"
    )


def _prepare_erase(
    session: _Session, options: LuksAmendOptions, random_bytes: Callable[[int], bytes]
) -> Luks2AmendPlan:
    header = session.header
    _check_erase_options(options)
    old_secret = None if options.old_secret is None else resolve_secret(options.old_secret)
    if options.keyslot is not None:
        keyslot = _check_keyslot_range(options.keyslot, unsigned=False)
        if old_secret is not None and not session.opens(old_secret, keyslot):
            raise not_holding_old_secret(keyslot)
        if not options.force and keyslot not in header.keyslots:
            raise already_erased(keyslot)
        if not options.force and session.bound == [keyslot]:
            raise only_active_keyslot(keyslot)
        targets = [keyslot] if keyslot in header.keyslots else []
    elif old_secret is not None:
        targets = [i for i in session.bound if session.opens(old_secret, i)]
        if not targets:
            raise CryptoError(NO_MATCHING_KEYSLOT)
        if not options.force and len(targets) == len(session.bound):
            raise CryptoError(ALL_KEYSLOTS_MATCH)
    else:
        raise CryptoError(ERASE_NEEDS_TARGET)

    names = ", ".join(str(i) for i in targets)
    if not targets:  # forced erase of a keyslot that does not exist: nothing to do
        return Luks2AmendPlan(
            session.volume,
            session.raw,
            [],
            header,
            f"erase keyslot {options.keyslot} (already inactive)",
        )
    metadata = copy.deepcopy(header.metadata)
    for index in targets:
        _forget(metadata, index)
    write = session.write_metadata(metadata, random_bytes)
    steps: list[Step] = list(write.steps)
    for index in targets:
        area = header.keyslots[index].area
        steps.append((area.offset, bytes(random_bytes(area.size))))
    steps.append(None)
    return Luks2AmendPlan(
        session.volume, session.raw, steps, write.header, f"erase keyslot {names}"
    )


def apply_luks2_amend(plan: Luks2AmendPlan, io: ImageIO) -> Luks2Header:
    """Perform the plan's writes and syncs in order; the volume adopts the new header."""
    if io.read(0, len(plan.expected_metadata)) != plan.expected_metadata:
        raise CryptoError(
            "The LUKS header changed on disk since the amend was prepared; nothing was written"
        )
    apply_steps(plan.steps, io.write, io.sync)
    plan.volume.adopt_header(plan.new_header)
    return plan.new_header
