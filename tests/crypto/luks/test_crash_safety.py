"""Crash safety: stop or fail every write and sync in turn, then look at the disk.

(The write order under test is documented in qmpd/crypto/luks/amend.py and
create.py.)

:class:`WriteBackCache` models a disk with a volatile write cache: writes
since the last sync may be lost, as any suffix of them (the cache drains in
order but stops anywhere), and the last write that reaches the platter may
be torn at any 512-byte sector boundary (a prefix or a suffix of its
sectors). The Nth operation (write or sync) raises, which both models an
I/O error the engine must survive and marks the instant of the crash.

For each operation (create, add, forced overwrite, erase) and each crash
point, every disk the crash can leave is checked with this engine: the
header is valid, every passphrase not being removed unlocks, and the volume
key is unchanged. A sample of those disks is checked with cryptsetup too.
"""

from __future__ import annotations

import errno
import hashlib

import pytest

from qmpd.crypto.errors import CryptoError
from qmpd.crypto.luks import (
    LuksAmendOptions, LuksCreateOptions, MemoryImageIO, apply_amend, create_volume,
    open_volume, prepare_amend, read_header)
from qmpd.crypto.luks.keyslot import read_material, try_slot
from qmpd.crypto.luks.volume import parse_header_bytes
from tests import oracles
from tests.crypto.luks.images import FAST, image_bytes, volume_key_of

SECTOR = 512
# The invariant does not depend on the cipher; a 16-byte key makes the key
# material (64000 bytes) four times smaller than the default's, and the
# many unlocks of this test four times faster.
SMALL = LuksCreateOptions(iter_time=FAST, cipher_alg="aes-128", cipher_mode="cbc",
                          ivgen_alg="plain64")


class InjectedFailure(OSError):
    pass


class WriteBackCache:
    """An ImageIO over a durable image and a volatile cache of pending writes."""

    def __init__(self, durable: bytes, fail_at: int | None = None) -> None:
        self.durable = bytearray(durable)
        self.pending: list[tuple[int, bytes]] = []
        self.operations = 0
        self.fail_at = fail_at

    def _tick(self) -> None:
        index = self.operations
        self.operations += 1
        if index == self.fail_at:
            raise InjectedFailure(errno.EIO, f"injected failure at operation {index}")

    @staticmethod
    def _apply(image: bytearray, offset: int, data: bytes) -> None:
        if offset + len(data) > len(image):
            image.extend(bytes(offset + len(data) - len(image)))
        image[offset:offset + len(data)] = data

    def _current(self) -> bytearray:
        image = bytearray(self.durable)
        for offset, data in self.pending:
            self._apply(image, offset, data)
        return image

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self._current()[offset:offset + length])

    def write(self, offset: int, data: bytes) -> None:
        self._tick()
        self.pending.append((offset, bytes(data)))

    def sync(self) -> None:
        self._tick()
        self.durable = self._current()
        self.pending.clear()

    def size(self) -> int:
        return len(self._current())

    def crash_states(self) -> list[bytes]:
        """Every image a crash now can leave on the disk (deduplicated)."""
        states: dict[bytes, bytes] = {}
        image = bytearray(self.durable)
        for k in range(len(self.pending) + 1):
            states.setdefault(hashlib.sha256(image).digest(), bytes(image))
            if k == len(self.pending):
                break
            offset, data = self.pending[k]
            for torn in _torn(offset, data):
                variant = bytearray(image)
                for piece_offset, piece in torn:
                    self._apply(variant, piece_offset, piece)
                states.setdefault(hashlib.sha256(variant).digest(), bytes(variant))
            self._apply(image, offset, data)
        return list(states.values())


def _torn(offset: int, data: bytes):
    """The sector-granular partial versions of a write: prefixes and suffixes.

    Header writes span one or two sectors and get every split. Key material
    spans hundreds of sectors, all equivalent for the invariant (any partial
    material is garbage to its one slot), so it is split at the first, the
    middle and the last boundary only.
    """
    cuts = [c for c in range((offset // SECTOR + 1) * SECTOR, offset + len(data), SECTOR)]
    pieces = []
    start = offset
    for cut in cuts + [offset + len(data)]:
        pieces.append((start, data[start - offset:cut - offset]))
        start = cut
    splits = range(1, len(pieces))
    if len(splits) > 5:
        splits = sorted({1, len(pieces) // 2, len(pieces) - 1})
    for n in splits:
        yield pieces[:n]
        yield pieces[n:]


def _run_to_each_crash(base: bytes, operation) -> list[list[bytes]]:
    """Run ``operation(io)`` failing at each operation in turn; the crash states."""
    probe = WriteBackCache(base)
    operation(probe)
    total = probe.operations
    assert total >= 2
    outcomes = []
    for fail_at in range(total + 1):   # total: no failure, then a crash
        io = WriteBackCache(base, fail_at)
        try:
            operation(io)
        except InjectedFailure:
            pass
        outcomes.append(io.crash_states())
    return outcomes


def _check_states(states_per_point, survivors, volume_key, maybe=(), holders=None,
                  payload_in_file=True):
    """Engine check: header valid, survivors unlock to volume_key, 'maybe' cleanly.

    With ``holders`` (slot -> passphrases it may hold), also: every active
    slot opens with one of its holders (no half-made or half-erased slot).
    """
    checked = []
    seen = set()
    for states in states_per_point:
        for state in states:
            fingerprint = hashlib.sha256(state).digest()
            if fingerprint in seen:
                continue
            seen.add(fingerprint)
            io = MemoryImageIO(state)
            read_header(io, payload_in_file=payload_in_file)
            if holders is not None:
                _check_no_dangling_slot(state, holders)
            for passphrase in survivors:
                volume = open_volume(io, passphrase, payload_in_file=payload_in_file)
                assert bytes(volume.volume_key) == volume_key, passphrase
                volume.close()
            for passphrase in maybe:
                try:
                    volume = open_volume(io, passphrase, payload_in_file=payload_in_file)
                except CryptoError as err:
                    assert str(err) == "Invalid password, cannot unlock any keyslot"
                else:
                    assert bytes(volume.volume_key) == volume_key
                    volume.close()
            checked.append(state)
    return checked


def _check_no_dangling_slot(state: bytes, holders: dict[int, set[bytes]]) -> None:
    header, spec = parse_header_bytes(state)
    hash_name = header.hash_spec_str
    io = MemoryImageIO(state)
    for index, slot in enumerate(header.slots):
        if not slot.is_active:
            continue
        material = read_material(io, header, index)
        assert any(try_slot(header, spec, hash_name, index, p, material) is not None
                   for p in holders.get(index, ())), f"slot {index} is active but opens with nothing"


def _amend_operation(base: bytes, passphrase_that_opens: bytes, **options):
    """apply_amend of a plan prepared once on ``base``: the writes under test."""
    base_io = MemoryImageIO(base)
    volume = open_volume(base_io, passphrase_that_opens)
    plan = prepare_amend(volume, base_io, LuksAmendOptions(**options))
    return lambda io: apply_amend(plan, io)


THREE = ((0, b"zero"), (1, b"one"), (3, b"three"))
WITH_SIX = ((0, b"zero"), (6, b"six"), (3, b"three"))
TWICE = ((0, b"zero"), (1, b"dup"), (6, b"dup"))

SCENARIOS = {
    # name: (image slots, amend options, survivors, passphrases that may go either way)
    "add to a free slot": (THREE, dict(state="active", new_secret=b"two", iter_time=FAST,
                                       opened_secret=b"zero"),
                           [b"zero", b"one", b"three"], [b"two"]),
    # Slot 6's entry straddles the header's two sectors.
    "add to slot 6": (THREE, dict(state="active", new_secret=b"new six", keyslot=6,
                                  iter_time=FAST, opened_secret=b"zero"),
                      [b"zero", b"one", b"three"], [b"new six"]),
    "forced overwrite": (THREE, dict(state="active", new_secret=b"uno", keyslot=1, force=True,
                                     iter_time=FAST, opened_secret=b"zero"),
                         [b"zero", b"three"], [b"one", b"uno"]),
    "forced overwrite of slot 6": (WITH_SIX, dict(state="active", new_secret=b"seis", keyslot=6,
                                                  force=True, iter_time=FAST, secret=b"three"),
                                   [b"zero", b"three"], [b"six", b"seis"]),
    "erase by keyslot": (THREE, dict(state="inactive", keyslot=1),
                         [b"zero", b"three"], [b"one"]),
    "erase slot 6": (WITH_SIX, dict(state="inactive", keyslot=6), [b"zero", b"three"], [b"six"]),
    "erase by old secret": (TWICE, dict(state="inactive", old_secret=b"dup"),
                            [b"zero"], [b"dup"]),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_amend_survives_a_crash_anywhere(name):
    slots, options, survivors, maybe = SCENARIOS[name]
    base = image_bytes(slots, SMALL)
    volume_key = volume_key_of(base, b"zero")
    outcomes = _run_to_each_crash(base, _amend_operation(base, b"zero", **options))
    holders = {slot: {p} for slot, p in slots}
    if options["state"] == "active":
        target = options.get("keyslot", next(i for i in range(8) if i not in holders))
        holders.setdefault(target, set()).add(options["new_secret"])
    checked = _check_states(outcomes, survivors, volume_key, maybe, holders)
    assert len(checked) > 3     # distinct disks: before, after, and torn ones
    # Without a crash the operation is complete.
    final = outcomes[-1][0] if len(outcomes[-1]) == 1 else None
    assert final is not None
    for passphrase in maybe:
        should_unlock = options["state"] == "active" and passphrase == options["new_secret"]
        try:
            open_volume(MemoryImageIO(final), passphrase).close()
            unlocked = True
        except CryptoError:
            unlocked = False
        assert unlocked == should_unlock, passphrase


def _deterministic_random():
    counter = [0]

    def random_bytes(n: int) -> bytes:
        out = b""
        while len(out) < n:
            counter[0] += 1
            out += hashlib.sha256(b"crash %d" % counter[0]).digest()
        return out[:n]
    return random_bytes


def _create_operation(io):
    create_volume(io, b"fresh", SMALL, random_bytes=_deterministic_random())


@pytest.mark.parametrize("old", ["empty", "old luks image"])
def test_create_leaves_the_old_image_nothing_or_the_whole_volume(old):
    """Each crash leaves the old volume intact, no LUKS header, or the new volume."""
    base = b"" if old == "empty" else image_bytes(THREE, SMALL)
    probe = MemoryImageIO()
    _create_operation(probe)
    volume_key = volume_key_of(bytes(probe.data), b"fresh")
    old_key = volume_key_of(base, b"zero") if base else None
    verdicts = set()
    seen = set()
    for states in _run_to_each_crash(base, _create_operation):
        for state in states:
            if hashlib.sha256(state).digest() in seen:
                continue
            seen.add(hashlib.sha256(state).digest())
            io = MemoryImageIO(state)
            try:
                read_header(io, payload_in_file=False)
            except CryptoError:
                verdicts.add("no volume")
                continue
            if state[:4096] == base[:4096]:
                for passphrase in (b"zero", b"one", b"three"):
                    volume = open_volume(io, passphrase, payload_in_file=False)
                    assert bytes(volume.volume_key) == old_key
                verdicts.add("old volume")
                continue
            volume = open_volume(io, b"fresh", payload_in_file=False)
            assert bytes(volume.volume_key) == volume_key
            verdicts.add("new volume")
    assert verdicts >= {"no volume", "new volume"}


@pytest.mark.interop
@pytest.mark.parametrize("name", ["add to slot 6", "forced overwrite", "erase by keyslot"])
def test_crash_states_pass_cryptsetup(name, tmp_path):
    oracles.require("cryptsetup")
    slots, options, survivors, maybe = SCENARIOS[name]
    base = image_bytes(slots, SMALL)
    volume_key = volume_key_of(base, b"zero")
    outcomes = _run_to_each_crash(base, _amend_operation(base, b"zero", **options))
    states = [s for states in outcomes for s in states]
    # A sample: the first, the last, and the torn ones in between.
    sample = [states[0], states[-1]] + states[1:-1:max(1, len(states) // 3)]
    for index, state in enumerate(sample):
        path = tmp_path / f"state{index}.img"
        path.write_bytes(state)
        for passphrase in survivors:
            assert oracles.cryptsetup_unlocks(str(path), passphrase), (index, passphrase)
        assert oracles.cryptsetup_volume_key(str(path), survivors[0]) == volume_key
