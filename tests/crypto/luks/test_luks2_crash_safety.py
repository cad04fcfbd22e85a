"""LUKS2 crash safety: fail every write and sync of an amend or a create in turn.

(The write orders under test are documented in qmpd/crypto/luks/luks2_amend.py,
luks2_write.py and luks2_create.py; the disk model is test_crash_safety's
WriteBackCache: lost suffixes of unsynced writes, torn writes, the Nth
operation failing.)

Every disk a crash can leave is checked three ways: as read_luks2 reads it,
and with each copy alone (the other zeroed), because a later loss of one
copy makes a reader fall back on the other. Whatever view is sound must
satisfy the invariant: every passphrase not being removed unlocks to the
unchanged volume key, and every keyslot the metadata lists opens with a
passphrase it may hold (no keyslot points at half-written material).
"""

from __future__ import annotations

import hashlib

import pytest

from qmpd.crypto.errors import CryptoError
from qmpd.crypto.luks import (
    LuksAmendOptions,
    MemoryImageIO,
    apply_luks2_amend,
    create_luks2_volume,
    open_luks2_volume,
    prepare_luks2_amend,
)
from qmpd.crypto.luks.luks2_header import read_luks2
from qmpd.crypto.luks.luks2_unlock import unlock_luks2
from tests import oracles
from tests.crypto.luks.test_crash_safety import (
    WriteBackCache, _deterministic_random, _run_to_each_crash)
from tests.crypto.luks.test_luks2_amend import SMALL, build, fixed_costs

HDR = 16384


def _views(state: bytes):
    """(name, reader) for the disk as it is and for each copy alone."""
    yield "both", lambda o, n: state[o:o + n]
    without_primary = bytes(HDR) + state[HDR:]
    yield "secondary alone", lambda o, n: without_primary[o:o + n]
    without_secondary = state[:HDR] + bytes(HDR) + state[2 * HDR:]
    yield "primary alone", lambda o, n: without_secondary[o:o + n]


def _opens(read, header, passphrase: bytes, keyslot: int | None = None) -> bytes | None:
    try:
        key, _ = unlock_luks2(read, header, passphrase, keyslot=keyslot)
    except CryptoError:
        return None
    return bytes(key)


def _check_states(outcomes, survivors, volume_key, holders):
    seen = set()
    views_checked = 0
    for states in outcomes:
        for state in states:
            fingerprint = hashlib.sha256(state).digest()
            if fingerprint in seen:
                continue
            seen.add(fingerprint)
            for name, read in _views(state):
                try:
                    header = read_luks2(read, detached_header=True)
                except CryptoError:
                    assert name != "both", "no sound metadata left"
                    continue
                views_checked += 1
                for passphrase in survivors:
                    assert _opens(read, header, passphrase) == volume_key, (name, passphrase)
                for index in header.keyslots:
                    assert any(_opens(read, header, p, index) == volume_key
                               for p in holders.get(index, ())), (name, index)
    return len(seen), views_checked


THREE = ((0, b"zero"), (1, b"one"), (3, b"three"))
TWICE = ((0, b"zero"), (1, b"dup"), (2, b"dup"))
SCENARIOS = {
    # name: (image, options, survivors, the passphrase being added or removed)
    "add to a free slot": (THREE, dict(state="active", new_secret=b"two", secret=b"zero"),
                           [b"zero", b"one", b"three"], {2: b"two"}),
    "add argon2id to slot 31": (THREE, dict(state="active", new_secret=b"a2", keyslot=31,
                                            pbkdf="argon2id", pbkdf_memory=32,
                                            pbkdf_parallel=1, secret=b"one"),
                                [b"zero", b"one", b"three"], {31: b"a2"}),
    # LUKS2 stages a forced overwrite: the slot's old passphrase or the new one
    # opens it at every instant, so no passphrase is ever without a keyslot.
    "forced overwrite": (THREE, dict(state="active", new_secret=b"uno", keyslot=1, force=True,
                                     secret=b"zero"),
                         [b"zero", b"three"], {1: b"uno"}),
    "erase by keyslot": (THREE, dict(state="inactive", keyslot=1), [b"zero", b"three"], {}),
    "erase by old secret": (TWICE, dict(state="inactive", old_secret=b"dup"), [b"zero"], {}),
}


def _amend_operation(base: bytes, **options):
    io = MemoryImageIO(base)
    volume = open_luks2_volume(io, b"zero", detached_header=True)
    if options["state"] == "active":
        options.setdefault("iter_time", 1)
        options.setdefault("pbkdf", "pbkdf2")
    plan = prepare_luks2_amend(volume, io, LuksAmendOptions(**options),
                               argon2_costs=fixed_costs)

    def operation(target):
        plan.volume = open_luks2_volume(MemoryImageIO(base), b"zero", detached_header=True)
        apply_luks2_amend(plan, target)
    return operation


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_amend_survives_a_crash_anywhere(name):
    slots, options, survivors, added = SCENARIOS[name]
    base = build(slots)
    volume_key = open_luks2_volume(MemoryImageIO(base), b"zero",
                                   detached_header=True).volume_key
    holders: dict[int, set[bytes]] = {}
    for index, passphrase in slots:
        holders.setdefault(index, set()).add(passphrase)
    for index, passphrase in added.items():
        holders.setdefault(index, set()).add(passphrase)
    outcomes = _run_to_each_crash(base, _amend_operation(base, **options))
    disks, views = _check_states(outcomes, survivors, bytes(volume_key), holders)
    assert disks > 6 and views > disks
    # Without a crash the operation is complete, and both copies agree.
    final = outcomes[-1]
    assert len(final) == 1
    header = read_luks2(lambda o, n: final[0][o:o + n], detached_header=True)
    assert header.other_copy.value == "current"
    removed = {p for _, p in slots} - set(survivors) - set(added.values())
    for passphrase in removed:
        assert _opens(lambda o, n: final[0][o:o + n], header, passphrase) is None
    for index, passphrase in added.items():
        assert _opens(lambda o, n: final[0][o:o + n], header, passphrase, index) \
            == bytes(volume_key)


def test_create_leaves_the_old_image_nothing_or_the_whole_volume():
    base = build(THREE)
    old_key = open_luks2_volume(MemoryImageIO(base), b"zero",
                                detached_header=True).volume_key

    def operation(io):
        create_luks2_volume(io, b"fresh", SMALL, random_bytes=_deterministic_random(),
                            digest_iter_time=0)
    probe = WriteBackCache(base)
    operation(probe)
    new_key = open_luks2_volume(MemoryImageIO(probe.read(0, probe.size())), b"fresh",
                                detached_header=True).volume_key
    verdicts = set()
    for states in _run_to_each_crash(base, operation):
        for state in states:
            read = (lambda s: lambda o, n: s[o:o + n])(state)
            try:
                header = read_luks2(read, detached_header=True)
            except CryptoError:
                verdicts.add("no volume")
                continue
            if _opens(read, header, b"fresh") == bytes(new_key):
                verdicts.add("new volume")
            else:
                for passphrase in (b"zero", b"one", b"three"):
                    assert _opens(read, header, passphrase) == bytes(old_key)
                verdicts.add("old volume")
    assert verdicts >= {"no volume", "new volume", "old volume"}


@pytest.mark.interop
def test_crash_states_pass_cryptsetup(tmp_path):
    oracles.require("cryptsetup")
    slots, options, survivors, added = SCENARIOS["forced overwrite"]
    base = build(slots)
    volume_key = bytes(open_luks2_volume(MemoryImageIO(base), b"zero",
                                         detached_header=True).volume_key)
    outcomes = _run_to_each_crash(base, _amend_operation(base, **options))
    states = [s for states in outcomes for s in states]
    sample = [states[0], states[-1]] + states[1:-1:max(1, len(states) // 4)]
    for index, state in enumerate(sample):
        path = tmp_path / f"state{index}.img"
        path.write_bytes(state)
        for passphrase in survivors:
            assert oracles.cryptsetup_unlocks(str(path), passphrase), (index, passphrase)
        assert oracles.cryptsetup_volume_key(str(path), survivors[0]) == volume_key
