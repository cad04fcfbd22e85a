"""Adding and erasing key slots: QEMU's amend semantics, crash-safe writes.

Two phases, so that the block layer can run the slow part in a worker
thread and still cancel before anything is written:

* :func:`prepare_amend` does every check (QEMU 7.2's
  qcrypto_block_luks_amend_add_keyslot / _erase_keyslots, same order, same
  texts) and all the CPU-heavy work (PBKDF2, AF split, encryption of the new
  key material, random bytes for erasure). It reads, never writes.
* :func:`apply_amend` performs the plan's writes and syncs, in order. It is
  the only function of the engine that modifies an existing volume.

Crash safety
============

Invariant: whatever instant the machine stops at, every passphrase that the
operation does not remove still unlocks the volume, and the volume key is
the same (cryptsetup agrees). Stronger, and what fixes the order below: no
slot is ever active with incomplete key material or a half-written entry,
so every active slot opens with the passphrase it held before or the one
being put in it. The writes are ordered thus:

add (target slot inactive)
    1. the new key material into the slot's own area, sync;
    2. the slot's 48-byte header entry (active, iterations, salt), sync.
    Before 2 is durable the slot is inactive and its area unused; after, it
    is complete.

add with ``force`` over an active slot
    1. the slot's entry as inactive, sync; 2. the material, sync; 3. the
    active entry, sync. The passphrase that was in the slot is being
    removed; no other slot is touched. (If it was the only active slot, a
    crash between 1 and 3 leaves no passphrase: the same as QEMU, which
    overwrites the slot in place; LUKS1 has no spare area to stage into.)

erase
    1. every target slot's entry as inactive (zero salt and iterations),
       sync; 2. random bytes over each target's key material, sync.
    Material is only destroyed once no header entry points to it.

Header entries: only the target slot's 48-byte entry is ever written (the
rest of the header never is), and its key-material offset and stripes never
change, so no write can spoil another slot or make the header invalid. An
entry inside one sector is written whole. Slot 6's entry straddles the
header's two sectors; it is written in two steps with a sync between, the
state word's sector last when activating and first when deactivating (see
:func:`_entry_writes`).

What this relies on: a write of an aligned 512-byte sector is all-or-nothing
(old or new content), as disks and file systems provide; anything else may
be reordered, torn at sector boundaries or lost after the last sync.
Erasure writes one pass of random bytes (QEMU writes 40; on today's disks
more passes add nothing but time). tests/crypto/luks/test_crash_safety.py
models exactly this: a write-back cache losing any suffix of the unsynced
writes, the last surviving write torn at sector boundaries, or the Nth
write or sync failing; it checks every resulting disk.

The header is re-read and checked before planning; apply refuses to write
if it changed on disk in between (nothing is written in that case).

``secret`` and the opening passphrase
=====================================

QEMU re-reads, at amend time, the secret object the image was opened with
when ``secret`` is absent. The caller does the same and passes its current
bytes as ``opened_secret``; ``secret`` stays what the user gave, because
erasing refuses a given ``secret``. When the passphrase checked against the
slots is the one that opened the volume and that slot's bytes on disk are
unchanged (see :class:`~qmpd.crypto.luks.volume.PassphraseWitness`), the
PBKDF2 work of re-unlocking is skipped: the outcome is the same as QEMU's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

from qmpd.crypto import pbkdf
from qmpd.crypto.errors import CryptoError
from qmpd.crypto.luks.create import DEFAULT_ITER_TIME, check_iter_time
from qmpd.crypto.luks.header import (
    HEADER_SIZE,
    NUM_KEY_SLOTS,
    SALT_LEN,
    SECTOR_SIZE,
    SLOT_INACTIVE,
    KeySlot,
    LuksHeader,
    slot_entry_offset,
)
from qmpd.crypto.luks.io import ImageIO
from qmpd.crypto.luks.keyslot import build_slot, read_material, try_slot, wipe
from qmpd.crypto.luks.volume import (
    LuksVolume,
    check_payload_in_file,
    find_key,
    parse_header_bytes,
    slot_state_digest,
)

SecretValue = bytes | bytearray | Callable[[], bytes | bytearray]


# -- QEMU's amend texts, shared with the LUKS2 engine ------------------------------


def resolve_secret(secret: SecretValue) -> bytes | bytearray:
    """A secret's bytes, looked up now if it is a lookup."""
    return secret() if callable(secret) else secret


def c_int(value: int) -> int:
    """An int64 stored into a C int (QEMU's ``int keyslot = opts->keyslot``)."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def check_add_members(options: "LuksAmendOptions") -> None:
    if options.new_secret is None:
        raise CryptoError("'new-secret' is required to activate a keyslot")
    if options.old_secret is not None:
        raise CryptoError("'old-secret' must not be given when activating keyslots")


def check_erase_members(options: "LuksAmendOptions", extra: tuple[str, ...] = ()) -> None:
    """The members an erase refuses, in QEMU's order (then ``extra``, ours)."""
    for name in ("new_secret", "iter_time", "secret", *extra):
        if getattr(options, name) is not None:
            member = name.replace("_", "-")
            raise CryptoError(f"'{member}' must not be given when erasing keyslots")


def not_holding_old_secret(keyslot: int) -> CryptoError:
    return CryptoError(
        f"Given keyslot {keyslot} doesn't contain the given old password for erase operation"
    )


def already_erased(keyslot: int) -> CryptoError:
    return CryptoError(f"Given keyslot {keyslot} is already erased (inactive) ")


def only_active_keyslot(keyslot: int) -> CryptoError:
    return CryptoError(
        f"Attempt to erase the only active keyslot {keyslot} which will erase all the data "
        "in the image irreversibly - refusing operation"
    )


NO_MATCHING_KEYSLOT = "No keyslots match given (old) password for erase operation"
ALL_KEYSLOTS_MATCH = (
    "All the active keyslots match the (old) password that was given and erasing them "
    "will erase all the data in the image irreversibly - refusing operation"
)
ERASE_NEEDS_TARGET = (
    "To erase keyslot(s), either explicit keyslot index or the password currently "
    "contained in them must be given"
)


@dataclass
class LuksAmendOptions:
    """QCryptoBlockAmendOptionsLUKS plus ``force``; secrets as bytes.

    ``None`` means "not given". A secret may also be a callable returning
    the bytes: it is called only where QEMU looks the secret up, so an
    unknown secret id is reported in QEMU's order, after the checks that
    come before the lookup. ``opened_secret`` is not a QMP option: it is
    the current value of the secret the volume was opened with, which the
    caller supplies for adding a key when ``secret`` is not given.
    """

    state: str
    new_secret: "SecretValue | None" = None
    old_secret: "SecretValue | None" = None
    keyslot: int | None = None
    iter_time: int | None = None
    secret: "SecretValue | None" = None
    force: bool = False
    opened_secret: "SecretValue | None" = field(default=None, repr=False)
    # The new keyslot's KDF (LUKS2; LUKS1 takes pbkdf2 only): "pbkdf2",
    # "argon2i" or "argon2id"; Argon2's memory in KiB and its lanes.
    pbkdf: str | None = None
    pbkdf_memory: int | None = None
    pbkdf_parallel: int | None = None

    def __repr__(self) -> str:
        given = [
            name
            for name in ("new_secret", "old_secret", "secret", "opened_secret")
            if getattr(self, name) is not None
        ]
        kdf = "".join(
            f", {name}={getattr(self, name)!r}"
            for name in ("pbkdf", "pbkdf_memory", "pbkdf_parallel")
            if getattr(self, name) is not None
        )
        return (
            f"LuksAmendOptions(state={self.state!r}, keyslot={self.keyslot}, "
            f"iter_time={self.iter_time}, force={self.force}{kdf}, given={given})"
        )


PBKDF_TYPES = ("pbkdf2", "argon2i", "argon2id")


def check_luks1_pbkdf(options: LuksAmendOptions) -> None:
    """LUKS1 keyslots are PBKDF2 only, with no Argon2 costs (cryptsetup's texts)."""
    if options.pbkdf is not None and options.pbkdf not in PBKDF_TYPES:
        raise CryptoError(f"Unknown PBKDF type {options.pbkdf}.")
    if options.pbkdf not in (None, "pbkdf2"):
        raise CryptoError("Requested PBKDF type is not supported for LUKS1.")
    if options.pbkdf_memory is not None or options.pbkdf_parallel is not None:
        raise CryptoError("PBKDF max memory or parallel threads must not be set with pbkdf2.")


@dataclass
class AmendPlan:
    """What :func:`apply_amend` will do: ordered writes and syncs, nothing secret."""

    volume: LuksVolume
    expected_header: bytes  # the header the plan was made against
    steps: list[tuple[int, bytes] | None]  # (offset, data) or None for sync
    new_header: LuksHeader
    description: str  # e.g. "add keyslot 1"

    def __repr__(self) -> str:
        return f"AmendPlan({self.description}, {len(self.steps)} steps)"


def _entry_writes(
    header: LuksHeader,
    index: int,
    *,
    activating: bool,
) -> list[tuple[int, bytes] | None]:
    """Steps writing slot ``index``'s entry so that no crash leaves it half-made.

    An entry within one sector is one write. Slot 6's entry straddles the
    header's two sectors: its state word, iteration count and first salt
    bytes are in sector 0, the rest of the salt in sector 1. Activating
    writes sector 1's part first (an inactive slot's salt means nothing),
    syncs, then flips the state in sector 0; deactivating flips the state
    first. Either way the slot is never active with a half-written salt.
    """
    offset = slot_entry_offset(index)
    data = header.slots[index].pack()
    boundary = (offset // SECTOR_SIZE + 1) * SECTOR_SIZE
    if offset + len(data) <= boundary:
        return [(offset, data)]
    head = (offset, data[: boundary - offset])
    tail = (boundary, data[boundary - offset :])
    return [tail, None, head] if activating else [head, None, tail]


class _Session:
    """One amend's view of the image: the fresh header and the slots' bytes."""

    def __init__(self, volume: LuksVolume, io: ImageIO) -> None:
        raw = io.read(0, HEADER_SIZE)
        header, spec = parse_header_bytes(raw, detached_header=volume.detached_header)
        if volume.payload_in_file:
            check_payload_in_file(header, io.size())
        if header.pack()[: slot_entry_offset(0)] != volume.header.pack()[: slot_entry_offset(0)]:
            raise CryptoError("The LUKS header changed on disk since the volume was opened")
        self.volume = volume
        self.io = io
        self.header = header
        self.raw = header.pack()
        self.spec = spec
        self.hash_name = header.hash_spec_str
        self._materials: dict[int, bytes] = {}

    def material(self, index: int) -> bytes:
        if index not in self._materials:
            self._materials[index] = read_material(self.io, self.header, index)
        return self._materials[index]

    def active_count(self) -> int:
        return sum(slot.is_active for slot in self.header.slots)

    def witnessed(self, passphrase: bytes | bytearray, index: int) -> bool:
        witness = self.volume.witness
        if witness is None or witness.slot_index != index:
            return False
        digest = slot_state_digest(self.header, index, self.material(index))
        return witness.proves(passphrase, digest)

    def opens(self, passphrase: bytes | bytearray, index: int) -> bool:
        """QEMU's load_key verdict for one slot (inactive slots never open)."""
        if not self.header.slots[index].is_active:
            return False
        if self.witnessed(passphrase, index):
            return True
        key = try_slot(
            self.header, self.spec, self.hash_name, index, passphrase, self.material(index)
        )
        if key is None:
            return False
        wipe(key)
        return True

    def unlock(self, passphrase: bytes | bytearray) -> None:
        """QEMU's find_key: succeed if any slot opens, else its error."""
        witness = self.volume.witness
        if (
            witness is not None
            and self.witnessed(passphrase, witness.slot_index)
            and self.header.slots[witness.slot_index].is_active
        ):
            return
        key, _, _ = find_key(self.io, self.header, self.spec, passphrase)
        wipe(key)


def _check_add(header: LuksHeader, options: LuksAmendOptions) -> tuple[int, SecretValue]:
    """QEMU's checks of an add before it reads anything: the slot and the
    secret that will unlock the volume key."""
    check_add_members(options)
    if options.keyslot is not None:
        keyslot = c_int(options.keyslot)
        if not 0 <= keyslot < NUM_KEY_SLOTS:
            raise CryptoError(
                f"Invalid keyslot {keyslot & 0xFFFFFFFF} specified, "
                f"must be between 0 and {NUM_KEY_SLOTS - 1}"
            )
    else:
        free = [i for i, slot in enumerate(header.slots) if not slot.is_active]
        if not free:
            raise CryptoError("Can't add a keyslot - all keyslots are in use")
        keyslot = free[0]
    if not options.force and header.slots[keyslot].is_active:
        raise CryptoError(f"Refusing to overwrite active keyslot {keyslot} - please erase it first")
    unlock_secret = options.secret if options.secret is not None else options.opened_secret
    if unlock_secret is None:
        raise CryptoError("The passphrase to unlock the volume is not available: give 'secret'")
    return keyslot, unlock_secret


def precheck_amend(header: LuksHeader, options: LuksAmendOptions) -> None:
    """The checks QEMU makes before an amend first reads the image, in its order.

    Uses the header as last read (no I/O) and looks up the secrets QEMU looks
    up before its first read; :func:`prepare_amend` repeats every check on
    the header fresh from disk, so this only decides *when* an error comes.
    """
    check_luks1_pbkdf(options)
    no_active_slot = not any(slot.is_active for slot in header.slots)
    if options.state == "active":
        resolve_secret(_check_add(header, options)[1])
        if no_active_slot:  # QEMU's find_key has no slot to read: fails at once
            raise CryptoError("Invalid password, cannot unlock any keyslot")
        return
    if options.state != "inactive":
        raise CryptoError(f"Invalid keyslot state '{options.state}'")
    check_erase_members(options)
    if options.old_secret is not None:
        resolve_secret(options.old_secret)
    if options.keyslot is not None:
        keyslot = c_int(options.keyslot)
        if not 0 <= keyslot < NUM_KEY_SLOTS:
            raise CryptoError(
                f"Invalid keyslot {keyslot} specified, must be between 0 and {NUM_KEY_SLOTS - 1}"
            )
        if options.old_secret is not None:
            if not header.slots[keyslot].is_active:
                # QEMU's load_key answers an inactive slot without reading it
                raise not_holding_old_secret(keyslot)
            return  # the slot is read next
        if not options.force and not header.slots[keyslot].is_active:
            raise already_erased(keyslot)
        if not options.force and sum(s.is_active for s in header.slots) == 1:
            raise only_active_keyslot(keyslot)
    elif options.old_secret is None:
        raise CryptoError(ERASE_NEEDS_TARGET)
    elif no_active_slot:  # no slot to try the old password on: no read
        raise CryptoError(NO_MATCHING_KEYSLOT)


def prepare_amend(
    volume: LuksVolume,
    io: ImageIO,
    options: LuksAmendOptions,
    *,
    random_bytes: Callable[[int], bytes] = os.urandom,
) -> AmendPlan:
    """Check ``options`` against the image and compute the writes; writes nothing."""
    check_luks1_pbkdf(options)
    session = _Session(volume, io)
    if options.state == "active":
        return _prepare_add(session, options, random_bytes)
    if options.state == "inactive":
        return _prepare_erase(session, options, random_bytes)
    raise CryptoError(f"Invalid keyslot state '{options.state}'")


def _prepare_add(
    session: _Session, options: LuksAmendOptions, random_bytes: Callable[[int], bytes]
) -> AmendPlan:
    header = session.header
    keyslot, unlock_secret = _check_add(header, options)
    was_active = header.slots[keyslot].is_active
    session.unlock(resolve_secret(unlock_secret))
    assert options.new_secret is not None  # _check_add() refused an add without it
    new_secret = resolve_secret(options.new_secret)

    iter_time = options.iter_time if options.iter_time is not None else DEFAULT_ITER_TIME
    check_iter_time(iter_time)
    iterations = pbkdf.iterations_for_time(session.hash_name, iter_time, header.key_bytes)
    slot = build_slot(
        header,
        session.spec,
        session.hash_name,
        keyslot,
        new_secret,
        session.volume.volume_key,
        iterations,
        random_bytes,
    )
    new_header = header.with_slot(keyslot, slot.entry)
    material_offset = slot.entry.key_offset * SECTOR_SIZE
    steps: list[tuple[int, bytes] | None] = []
    if was_active:
        steps += _entry_writes(_inactive(header, keyslot), keyslot, activating=False)
        steps.append(None)
    steps += [(material_offset, slot.material), None]
    steps += _entry_writes(new_header, keyslot, activating=True)
    steps.append(None)
    return AmendPlan(session.volume, session.raw, steps, new_header, f"add keyslot {keyslot}")


def _inactive(header: LuksHeader, index: int) -> LuksHeader:
    old = header.slots[index]
    return header.with_slot(
        index, KeySlot(SLOT_INACTIVE, 0, bytes(SALT_LEN), old.key_offset, old.stripes)
    )


def _prepare_erase(
    session: _Session, options: LuksAmendOptions, random_bytes: Callable[[int], bytes]
) -> AmendPlan:
    header = session.header
    check_erase_members(options)
    old_secret = None if options.old_secret is None else resolve_secret(options.old_secret)
    if options.keyslot is not None:
        keyslot = c_int(options.keyslot)
        if not 0 <= keyslot < NUM_KEY_SLOTS:
            raise CryptoError(
                f"Invalid keyslot {keyslot} specified, must be between 0 and {NUM_KEY_SLOTS - 1}"
            )
        if old_secret is not None and not session.opens(old_secret, keyslot):
            raise not_holding_old_secret(keyslot)
        if not options.force and not header.slots[keyslot].is_active:
            raise already_erased(keyslot)
        if not options.force and session.active_count() == 1:
            raise only_active_keyslot(keyslot)
        targets = [keyslot]
    elif old_secret is not None:
        targets = [i for i in range(NUM_KEY_SLOTS) if session.opens(old_secret, i)]
        if not targets:
            raise CryptoError(NO_MATCHING_KEYSLOT)
        if not options.force and len(targets) == session.active_count():
            raise CryptoError(ALL_KEYSLOTS_MATCH)
    else:
        raise CryptoError(ERASE_NEEDS_TARGET)

    new_header = header
    for index in targets:
        new_header = _inactive(new_header, index)
    steps: list[tuple[int, bytes] | None] = []
    for index in targets:
        steps += _entry_writes(new_header, index, activating=False)
    steps.append(None)
    length = header.material_length()
    for index in targets:
        garbage = bytes(random_bytes(length))
        steps.append((header.slots[index].key_offset * SECTOR_SIZE, garbage))
    steps.append(None)
    names = ", ".join(str(i) for i in targets)
    return AmendPlan(session.volume, session.raw, steps, new_header, f"erase keyslot {names}")


def apply_amend(plan: AmendPlan, io: ImageIO) -> None:
    """Perform the plan's writes and syncs in order; then the volume shows the new header."""
    if io.read(0, HEADER_SIZE) != plan.expected_header:
        raise CryptoError(
            "The LUKS header changed on disk since the amend was prepared; nothing was written"
        )
    for step in plan.steps:
        if step is None:
            io.sync()
        else:
            io.write(*step)
    plan.volume.header = plan.new_header
