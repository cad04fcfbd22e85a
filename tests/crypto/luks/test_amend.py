"""Adding and erasing key slots: QEMU 7.2's amend semantics and every text."""

from __future__ import annotations

import pytest

from qmpd.crypto.errors import CryptoError
from qmpd.crypto.luks import (
    LuksAmendOptions, MemoryImageIO, apply_amend, open_volume, precheck_amend, prepare_amend)
from qmpd.crypto.luks import amend as amend_module
from tests.crypto.luks.images import FAST, image_bytes, volume_key_of

# Slots 0, 1, 3 hold "zero", "one", "three"; 2 and 4-7 are free.
THREE = image_bytes(((0, b"zero"), (1, b"one"), (3, b"three")))
ONE = image_bytes(((0, b"zero"),))
SAME_TWICE = image_bytes(((0, b"zero"), (1, b"dup"), (2, b"dup")))


def _open(data: bytes, passphrase: bytes = b"zero"):
    io = MemoryImageIO(data)
    return io, open_volume(io, passphrase)


def _amend(io, volume, **kw):
    kw.setdefault("opened_secret", b"zero")
    plan = prepare_amend(volume, io, LuksAmendOptions(**kw))
    apply_amend(plan, io)
    return plan


def _active(io) -> list[int]:
    _, volume = _open(bytes(io.data))
    return [i for i, s in enumerate(volume.header.slots) if s.is_active]


def _fails(data: bytes, text: str, **kw) -> None:
    io, volume = _open(data)
    kw.setdefault("opened_secret", b"zero")
    before = bytes(io.data)
    with pytest.raises(CryptoError) as err:
        prepare_amend(volume, io, LuksAmendOptions(**kw))
    assert str(err.value) == text
    assert bytes(io.data) == before


# -- add

def test_add_takes_the_first_free_slot_and_keeps_the_volume_key():
    io, volume = _open(THREE)
    plan = _amend(io, volume, state="active", new_secret=b"two", iter_time=FAST)
    assert plan.description == "add keyslot 2"
    assert _active(io) == [0, 1, 2, 3]
    assert volume_key_of(bytes(io.data), b"two") == volume_key_of(THREE, b"three")
    assert volume.header.slots[2].is_active       # the volume shows the new header


def test_add_to_a_given_slot_with_an_explicit_secret():
    io, volume = _open(THREE)
    _amend(io, volume, state="active", new_secret=b"seven", keyslot=7, secret=b"three",
           iter_time=FAST, opened_secret=None)
    assert _active(io) == [0, 1, 3, 7]
    assert volume_key_of(bytes(io.data), b"seven") == volume_key_of(THREE, b"zero")


def test_forced_overwrite_of_an_active_slot():
    io, volume = _open(THREE)
    _amend(io, volume, state="active", new_secret=b"uno", keyslot=1, force=True,
           iter_time=FAST)
    assert _active(io) == [0, 1, 3]
    with pytest.raises(CryptoError):
        open_volume(io, b"one")
    assert volume_key_of(bytes(io.data), b"uno") == volume_key_of(THREE, b"zero")


def test_iterations_follow_iter_time_with_qemus_minimum():
    io, volume = _open(ONE)
    _amend(io, volume, state="active", new_secret=b"x", iter_time=1)
    assert volume.header.slots[1].iterations >= 1000


@pytest.mark.parametrize("kw, text", [
    (dict(), "'new-secret' is required to activate a keyslot"),
    (dict(new_secret=b"n", old_secret=b"zero"),
     "'old-secret' must not be given when activating keyslots"),
    (dict(new_secret=b"n", keyslot=8), "Invalid keyslot 8 specified, must be between 0 and 7"),
    # QEMU prints the int with %u here.
    (dict(new_secret=b"n", keyslot=-1),
     "Invalid keyslot 4294967295 specified, must be between 0 and 7"),
    (dict(new_secret=b"n", keyslot=3),
     "Refusing to overwrite active keyslot 3 - please erase it first"),
    (dict(new_secret=b"n", secret=b"wrong"), "Invalid password, cannot unlock any keyslot"),
    (dict(new_secret=b"n", opened_secret=b"changed since open"),
     "Invalid password, cannot unlock any keyslot"),
    (dict(new_secret=b"n", iter_time=0),
     "iter-time must be a positive number of milliseconds, not 0"),
])
def test_add_refusals(kw, text):
    _fails(THREE, text, state="active", **kw)


def test_add_when_every_slot_is_in_use():
    io, volume = _open(THREE)
    for _ in range(5):
        _amend(io, volume, state="active", new_secret=b"more", iter_time=FAST)
    _fails(bytes(io.data), "Can't add a keyslot - all keyslots are in use",
           state="active", new_secret=b"n")


def test_add_with_a_keyslot_that_wraps_like_a_c_int():
    # QEMU stores the int64 option in an int: 2**32 + 2 is slot 2.
    io, volume = _open(THREE)
    plan = _amend(io, volume, state="active", new_secret=b"wrapped", keyslot=2**32 + 2,
                  iter_time=FAST)
    assert plan.description == "add keyslot 2"


# -- erase

def test_erase_by_keyslot_overwrites_the_material():
    io, volume = _open(THREE)
    offset = volume.header.slots[1].key_offset * 512
    material = bytes(io.data[offset:offset + 256000])
    _amend(io, volume, state="inactive", keyslot=1, opened_secret=None)
    assert _active(io) == [0, 3]
    slot = volume.header.slots[1]
    assert (slot.iterations, slot.salt) == (0, bytes(32))
    assert bytes(io.data[offset:offset + 256000]) != material
    with pytest.raises(CryptoError):
        open_volume(io, b"one")


def test_erase_by_old_secret_erases_every_matching_slot():
    io, volume = _open(SAME_TWICE)
    plan = _amend(io, volume, state="inactive", old_secret=b"dup", opened_secret=None)
    assert plan.description == "erase keyslot 1, 2"
    assert _active(io) == [0]


def test_erase_by_keyslot_and_matching_old_secret():
    io, volume = _open(THREE)
    _amend(io, volume, state="inactive", keyslot=3, old_secret=b"three", opened_secret=None)
    assert _active(io) == [0, 1]


def test_force_erases_the_last_slot_and_an_inactive_one():
    io, volume = _open(ONE)
    _amend(io, volume, state="inactive", keyslot=5, force=True, opened_secret=None)
    _amend(io, volume, state="inactive", keyslot=0, force=True, opened_secret=None)
    assert not any(s.is_active for s in volume.header.slots)
    # with no active slot, QEMU fails an add's unlock and an erase by password
    # before any read: precheck (the job's synchronous part) answers
    for kw, text in [(dict(state="active", new_secret=b"n", secret=b"zero"),
                      "Invalid password, cannot unlock any keyslot"),
                     (dict(state="inactive", old_secret=b"zero"),
                      "No keyslots match given (old) password for erase operation")]:
        with pytest.raises(CryptoError) as err:
            precheck_amend(volume.header, LuksAmendOptions(**kw))
        assert str(err.value) == text


@pytest.mark.parametrize("kw, text", [
    (dict(new_secret=b"n", keyslot=1), "'new-secret' must not be given when erasing keyslots"),
    (dict(iter_time=10, keyslot=1), "'iter-time' must not be given when erasing keyslots"),
    (dict(secret=b"zero", keyslot=1), "'secret' must not be given when erasing keyslots"),
    (dict(keyslot=8), "Invalid keyslot 8 specified, must be between 0 and 7"),
    (dict(keyslot=-1), "Invalid keyslot -1 specified, must be between 0 and 7"),
    (dict(keyslot=2), "Given keyslot 2 is already erased (inactive) "),
    (dict(keyslot=1, old_secret=b"three"),
     "Given keyslot 1 doesn't contain the given old password for erase operation"),
    # An inactive slot contains no password, forced or not.
    (dict(keyslot=2, old_secret=b"three", force=True),
     "Given keyslot 2 doesn't contain the given old password for erase operation"),
    (dict(old_secret=b"nobody"), "No keyslots match given (old) password for erase operation"),
    (dict(), "To erase keyslot(s), either explicit keyslot index or the password "
             "currently contained in them must be given"),
])
def test_erase_refusals(kw, text):
    _fails(THREE, text, state="inactive", opened_secret=None, **kw)


def test_erase_refuses_to_lose_the_data():
    _fails(ONE, "Attempt to erase the only active keyslot 0 which will erase all the "
                "data in the image irreversibly - refusing operation",
           state="inactive", keyslot=0, opened_secret=None)
    _fails(ONE, "All the active keyslots match the (old) password that was given and "
                "erasing them will erase all the data in the image irreversibly - "
                "refusing operation",
           state="inactive", old_secret=b"zero", opened_secret=None)


def test_bad_state():
    _fails(ONE, "Invalid keyslot state 'gone'", state="gone")


# -- the opening passphrase, the witness, and a changing disk

def test_the_opening_passphrase_is_not_rederived(monkeypatch):
    io, volume = _open(THREE)
    calls = []
    real = amend_module.find_key
    monkeypatch.setattr(amend_module, "find_key", lambda *a: calls.append(1) or real(*a))
    _amend(io, volume, state="active", new_secret=b"two", iter_time=FAST)
    assert calls == []
    # Another passphrase is checked the long way, with the same outcome as QEMU.
    _amend(io, volume, state="active", new_secret=b"four", iter_time=FAST, secret=b"one")
    assert calls == [1]


def test_the_witness_is_void_once_its_slot_changed():
    io, volume = _open(THREE)        # "zero" opened slot 0
    _amend(io, volume, state="active", new_secret=b"new zero", keyslot=0, force=True,
           iter_time=FAST)
    _fails_with_volume(io, volume, "Invalid password, cannot unlock any keyslot",
                       state="active", new_secret=b"x", opened_secret=b"zero")


def _fails_with_volume(io, volume, text, **kw):
    with pytest.raises(CryptoError) as err:
        prepare_amend(volume, io, LuksAmendOptions(**kw))
    assert str(err.value) == text


def test_a_reformatted_image_is_refused():
    io, volume = _open(THREE)
    io.data[132] ^= 1      # the master-key digest salt
    _fails_with_volume(io, volume, "The LUKS header changed on disk since the volume was opened",
                       state="active", new_secret=b"x", opened_secret=b"zero")


def test_apply_writes_nothing_if_the_header_changed_after_prepare():
    io, volume = _open(THREE)
    plan = prepare_amend(volume, io, LuksAmendOptions(
        state="active", new_secret=b"two", iter_time=FAST, opened_secret=b"zero"))
    other = prepare_amend(volume, io, LuksAmendOptions(
        state="inactive", keyslot=1))
    apply_amend(other, io)
    before = bytes(io.data)
    with pytest.raises(CryptoError, match="nothing was written"):
        apply_amend(plan, io)
    assert bytes(io.data) == before


def test_the_plan_holds_no_secret():
    io, volume = _open(THREE)
    options = LuksAmendOptions(state="active", new_secret=b"hunter2", iter_time=FAST,
                               opened_secret=b"zero")
    plan = prepare_amend(volume, io, options)
    assert "hunter2" not in repr(plan) and "hunter2" not in repr(options)
    key = bytes(volume.volume_key)
    for step in plan.steps:
        if step is not None:
            assert key not in step[1] and b"hunter2" not in step[1]
