"""LUKS2 key add/erase: QEMU's checks and texts, cryptsetup's view of the result.

In-memory images come from this engine's create (pbkdf2 at 1000 iterations,
a 32-byte key, a small keyslots area, detached header); interop images from
``cryptsetup luksFormat --type luks2`` with passphrases in keyslots 0, 5
and 31. Argon2 keyslots this engine adds use fixed small costs (the
calibration is tested on its own).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmpd.crypto.errors import CryptoError
from qmpd.crypto.luks import (
    Luks2CreateOptions,
    LuksAmendOptions,
    MemoryImageIO,
    apply_luks2_amend,
    create_luks2_volume,
    open_luks2_volume,
    precheck_amend,
    precheck_luks2_amend,
    prepare_luks2_amend,
    read_header,
)
from qmpd.crypto.luks.luks2_header import read_luks2
from qmpd.crypto.luks.luks2_unlock import WRONG_PASSPHRASE, unlock_luks2
from qmpd.crypto.luks.luks2_write import other_copy_salt, plan_metadata_write
from tests.crypto.luks.images import image_bytes
from tests.oracles import cryptsetup_unlocks, cryptsetup_volume_key, require, run


def fixed_costs(kind: str, iter_time_ms: int, memory_kib: int, parallel: int):
    return 4, max(32, 8 * parallel)


AREA = 131072           # a 32-byte key's area
SMALL = Luks2CreateOptions(cipher_alg="aes-128", cipher_mode="xts", iter_time=1,
                           pbkdf="pbkdf2", keyslots_size=6 * AREA, detached_header=True)
_cache: dict[tuple, bytes] = {}


def build(slots: tuple[tuple[int, bytes], ...], options: Luks2CreateOptions = SMALL) -> bytes:
    """An in-memory image whose keyslot i holds p for each (i, p); slot 0 first."""
    key = (slots, repr(options))
    if key not in _cache:
        io = MemoryImageIO()
        (first_slot, first), rest = slots[0], slots[1:]
        assert first_slot == 0
        volume = create_luks2_volume(io, first, options, argon2_costs=fixed_costs,
                                     digest_iter_time=0)
        for index, passphrase in rest:
            plan = prepare_luks2_amend(volume, io, LuksAmendOptions(
                "active", new_secret=passphrase, keyslot=index, iter_time=1, pbkdf="pbkdf2",
                secret=first))
            apply_luks2_amend(plan, io)
        volume.close()
        _cache[key] = bytes(io.data)
    return _cache[key]


def amend(data: bytes, opener: bytes, *, is_detached: bool = True, **options) -> bytes:
    io = MemoryImageIO(data)
    volume = open_luks2_volume(io, opener, detached_header=is_detached)
    options.setdefault("iter_time", 1 if options.get("state") == "active" else None)
    if options["state"] == "active":
        options.setdefault("pbkdf", "pbkdf2")
        options.setdefault("secret", opener)
    plan = prepare_luks2_amend(volume, io, LuksAmendOptions(**options),
                               argon2_costs=fixed_costs)
    new_header = apply_luks2_amend(plan, io)
    assert volume.header is new_header
    volume.close()
    return bytes(io.data)


def opens(data: bytes, passphrase: bytes, keyslot: int | None = None,
          is_detached: bool = True) -> bytes | None:
    read = MemoryImageIO(data).read
    header = read_luks2(read, detached_header=is_detached)
    try:
        key, _ = unlock_luks2(read, header, passphrase, keyslot=keyslot)
    except CryptoError as err:
        if str(err) == WRONG_PASSPHRASE or "is not active" in str(err):
            return None
        raise
    return bytes(key)


THREE = ((0, b"zero"), (1, b"one"), (3, b"three"))


def volume_key(data: bytes) -> bytes:
    key = opens(data, b"zero")
    assert key is not None
    return key


# -- in memory: semantics and texts ------------------------------------------------

def test_add_to_first_free_slot_and_erase():
    base = build(THREE)
    added = amend(base, b"zero", state="active", new_secret=b"two")
    header = read_luks2(MemoryImageIO(added).read, detached_header=True)
    assert sorted(header.keyslots) == [0, 1, 2, 3]
    assert header.digests[0].keyslots == (0, 1, 3, 2)      # appended, as cryptsetup does
    assert list(header.metadata["keyslots"]) == ["0", "1", "3", "2"]
    assert opens(added, b"two", 2) == volume_key(base)
    before = read_luks2(MemoryImageIO(base).read, detached_header=True)
    assert header.seqid == before.seqid + 1
    # first fit: slots 0, 1, 3 take the first three areas, 2 goes after them
    assert header.keyslots[2].area.offset == 32768 + 3 * AREA
    erased = amend(added, b"zero", state="inactive", keyslot=1)
    after = read_luks2(MemoryImageIO(erased).read, detached_header=True)
    assert sorted(after.keyslots) == [0, 2, 3] and after.digests[0].keyslots == (0, 3, 2)
    old_area = header.keyslots[1].area
    assert erased[old_area.offset:old_area.offset + old_area.size] != \
        added[old_area.offset:old_area.offset + old_area.size]
    assert opens(erased, b"one") is None
    # the freed area is reused first
    again = amend(erased, b"two", state="active", new_secret=b"uno", keyslot=20)
    assert read_luks2(MemoryImageIO(again).read, detached_header=True) \
        .keyslots[20].area.offset == old_area.offset


def test_forced_overwrite_stages_into_a_new_area():
    base = build(THREE)
    header = read_luks2(MemoryImageIO(base).read, detached_header=True)
    new = amend(base, b"zero", state="active", new_secret=b"uno", keyslot=1, force=True)
    after = read_luks2(MemoryImageIO(new).read, detached_header=True)
    old_area, new_area = header.keyslots[1].area, after.keyslots[1].area
    assert new_area.offset != old_area.offset
    assert new[old_area.offset:old_area.offset + old_area.size] != \
        base[old_area.offset:old_area.offset + old_area.size]
    assert opens(new, b"one") is None and opens(new, b"uno", 1) == volume_key(base)


def test_argon2_keyslot_shape():
    new = amend(build(THREE), b"zero", state="active", new_secret=b"a2", pbkdf="argon2i",
                pbkdf_memory=64, pbkdf_parallel=2)
    slot = json.loads(json.dumps(read_luks2(MemoryImageIO(new).read, detached_header=True)
                                 .metadata["keyslots"]["2"]))
    assert list(slot) == ["type", "key_size", "af", "area", "kdf"]
    assert slot["kdf"]["type"] == "argon2i" and (slot["kdf"]["time"], slot["kdf"]["memory"]) \
        == fixed_costs("argon2i", 1, 64, 2)
    assert list(slot["kdf"]) == ["type", "time", "memory", "cpus", "salt"]
    assert slot["area"] == {"type": "raw", "offset": str(32768 + 3 * AREA), "size": str(AREA),
                            "encryption": "aes-xts-plain64", "key_size": 32}
    assert slot["af"] == {"type": "luks1", "stripes": 4000, "hash": "sha256"}
    assert "priority" not in slot
    assert opens(new, b"a2", 2) is not None


def test_tokens_and_unknown_members_are_kept():
    base = build(THREE)
    io = MemoryImageIO(base)
    volume = open_luks2_volume(io, b"zero", detached_header=True)
    header = read_luks2(io.read, detached_header=True)
    metadata = json.loads(json.dumps(header.metadata))
    metadata["tokens"]["3"] = {"type": "x-test", "keyslots": ["1", "3"], "blob": [1, "/", None]}
    metadata["config"]["flags"] = ["allow-discards"]
    metadata["zz-unknown"] = {"a": 1}
    plan = plan_metadata_write(header, metadata, other_salt=other_copy_salt(header, io.read),
                               detached_header=True)
    for step in plan.steps:
        if step is not None:
            io.write(*step)
    volume.close()
    added = amend(bytes(io.data), b"zero", state="active", new_secret=b"two")
    meta = read_luks2(MemoryImageIO(added).read, detached_header=True).metadata
    assert meta["tokens"] == metadata["tokens"] and meta["zz-unknown"] == {"a": 1}
    assert meta["config"]["flags"] == ["allow-discards"]
    erased = amend(added, b"zero", state="inactive", keyslot=1)
    meta = read_luks2(MemoryImageIO(erased).read, detached_header=True).metadata
    assert meta["tokens"]["3"] == {"type": "x-test", "keyslots": ["3"], "blob": [1, "/", None]}


ERRORS = [
    (dict(state="active", new_secret=b"n", keyslot=32),
     "Invalid keyslot 32 specified, must be between 0 and 31"),
    (dict(state="active", new_secret=b"n", keyslot=-1),
     "Invalid keyslot 4294967295 specified, must be between 0 and 31"),
    (dict(state="active", new_secret=b"n", keyslot=1),
     "Refusing to overwrite active keyslot 1 - please erase it first"),
    (dict(state="active"), "'new-secret' is required to activate a keyslot"),
    (dict(state="active", new_secret=b"n", old_secret=b"o"),
     "'old-secret' must not be given when activating keyslots"),
    (dict(state="active", new_secret=b"n", pbkdf="scrypt"), "Unknown PBKDF type scrypt."),
    (dict(state="active", new_secret=b"n", pbkdf="pbkdf2", pbkdf_memory=64),
     "PBKDF max memory or parallel threads must not be set with pbkdf2."),
    (dict(state="active", new_secret=b"n", pbkdf_parallel=5),
     "Requested maximum PBKDF parallel cost is too high (maximum is 4)."),
    (dict(state="active", new_secret=b"n", pbkdf_memory=4 * 1024 * 1024 + 1),
     "Requested maximum PBKDF memory cost is too high (maximum is 4194304 kilobytes)."),
    (dict(state="active", new_secret=b"n", pbkdf_parallel=0),
     "Requested PBKDF parallel threads cannot be zero."),
    (dict(state="inactive", keyslot=-1), "Invalid keyslot -1 specified, must be between 0 and 31"),
    (dict(state="inactive", keyslot=2), "Given keyslot 2 is already erased (inactive) "),
    (dict(state="inactive", keyslot=2, old_secret=b"zero"),
     "Given keyslot 2 doesn't contain the given old password for erase operation"),
    (dict(state="inactive"), "To erase keyslot(s), either explicit keyslot index or the "
                             "password currently contained in them must be given"),
    (dict(state="inactive", keyslot=1, iter_time=5),
     "'iter-time' must not be given when erasing keyslots"),
    (dict(state="inactive", keyslot=1, pbkdf="argon2id"),
     "'pbkdf' must not be given when erasing keyslots"),
    (dict(state="inactive", keyslot=1, secret=b"zero"),
     "'secret' must not be given when erasing keyslots"),
    (dict(state="bogus"), "Invalid keyslot state 'bogus'"),
]


@pytest.mark.parametrize("options,text", ERRORS)
def test_errors_in_precheck_and_prepare(options, text):
    base = build(THREE)
    io = MemoryImageIO(base)
    volume = open_luks2_volume(io, b"zero", detached_header=True)
    amend_options = LuksAmendOptions(**{"secret": b"zero", **options}
                                     if options["state"] == "active" else options)
    with pytest.raises(CryptoError) as precheck:
        precheck_luks2_amend(volume.header, amend_options)
    assert str(precheck.value) == text
    with pytest.raises(CryptoError) as prepare:
        prepare_luks2_amend(volume, io, amend_options, argon2_costs=fixed_costs)
    assert str(prepare.value) == text
    assert bytes(io.data) == base


def test_errors_that_need_the_keyslots():
    only = build(((0, b"zero"),))
    with pytest.raises(CryptoError, match="^Attempt to erase the only active keyslot 0 "):
        amend(only, b"zero", state="inactive", keyslot=0)
    twice = build(((0, b"dup"), (4, b"dup")))
    with pytest.raises(CryptoError, match="^All the active keyslots match the \\(old\\) "):
        amend(twice, b"dup", state="inactive", old_secret=b"dup")
    with pytest.raises(CryptoError, match="^No keyslots match given \\(old\\) password"):
        amend(build(THREE), b"zero", state="inactive", old_secret=b"nope")
    with pytest.raises(CryptoError, match=f"^{WRONG_PASSPHRASE}$"):
        amend(build(THREE), b"zero", state="active", new_secret=b"n", secret=b"wrong")
    full = build(tuple(enumerate([b"a", b"b", b"c", b"d", b"e", b"f"])))
    with pytest.raises(CryptoError, match="^No space for new keyslot.$"):
        amend(full, b"a", state="active", new_secret=b"g")
    # forced erase of an inactive keyslot writes nothing
    assert amend(build(THREE), b"zero", state="inactive", keyslot=9, force=True) == build(THREE)
    # erase by old secret: every keyslot holding it
    erased = amend(build(((0, b"zero"), (1, b"dup"), (2, b"dup"))), b"zero", state="inactive",
                   old_secret=b"dup")
    assert sorted(read_luks2(MemoryImageIO(erased).read, detached_header=True).keyslots) == [0]


def test_unmet_requirements_refuse_key_updates():
    base = build(THREE)
    io = MemoryImageIO(base)
    volume = open_luks2_volume(io, b"zero", detached_header=True)
    header = read_luks2(io.read, detached_header=True)
    metadata = json.loads(json.dumps(header.metadata))
    metadata["config"]["requirements"] = {"mandatory": ["future-thing"]}
    plan = plan_metadata_write(header, metadata, other_salt=None, detached_header=True)
    for step in plan.steps:
        if step is not None:
            io.write(*step)
    text = ("Unmet LUKS2 requirements detected (future-thing); "
            "qmpd cannot update keys of this image")
    options = LuksAmendOptions("active", new_secret=b"n", secret=b"zero", iter_time=1,
                               pbkdf="pbkdf2")
    with pytest.raises(CryptoError, match=f"^{text}$".replace("(", "\\(").replace(")", "\\)")):
        precheck_luks2_amend(read_luks2(io.read, detached_header=True), options)
    with pytest.raises(CryptoError, match="qmpd cannot update keys of this image$"):
        prepare_luks2_amend(volume, io, options)


def test_apply_refuses_when_the_header_changed():
    base = build(THREE)
    io = MemoryImageIO(base)
    volume = open_luks2_volume(io, b"zero", detached_header=True)
    plan = prepare_luks2_amend(volume, io, LuksAmendOptions(
        "active", new_secret=b"SECRET-N", secret=b"zero", iter_time=1, pbkdf="pbkdf2"))
    assert repr(plan) == "Luks2AmendPlan(add keyslot 2, 10 steps)"
    changed = amend(base, b"zero", state="inactive", keyslot=3)
    io.data = bytearray(changed)
    with pytest.raises(CryptoError, match="changed on disk since the amend was prepared; "
                                          "nothing was written"):
        apply_luks2_amend(plan, io)
    assert bytes(io.data) == changed


def test_luks1_takes_pbkdf2_only():
    header = read_header(MemoryImageIO(image_bytes(((0, b"zero"),))))
    for options, text in [
        (dict(pbkdf="argon2id"), "Requested PBKDF type is not supported for LUKS1."),
        (dict(pbkdf="nope"), "Unknown PBKDF type nope."),
        (dict(pbkdf="pbkdf2", pbkdf_memory=5),
         "PBKDF max memory or parallel threads must not be set with pbkdf2."),
        (dict(pbkdf_parallel=1), "PBKDF max memory or parallel threads must not be set "
                                 "with pbkdf2."),
    ]:
        with pytest.raises(CryptoError) as err:
            precheck_amend(header, LuksAmendOptions("active", new_secret=b"n", secret=b"zero",
                                                    **options))
        assert str(err.value) == text
    precheck_amend(header, LuksAmendOptions("active", new_secret=b"n", secret=b"zero",
                                            pbkdf="pbkdf2"))


def test_secrets_stay_out_of_reprs_and_errors():
    base = build(THREE)
    options = LuksAmendOptions("active", new_secret=b"SECRET-N", secret=b"zero", keyslot=1)
    assert "SECRET" not in repr(options)
    with pytest.raises(CryptoError) as err:
        amend(base, b"zero", state="active", new_secret=b"SECRET-N", keyslot=1)
    assert "SECRET" not in str(err.value)


# -- a model of the slot set, random operation sequences ---------------------------------

_pw = st.sampled_from([b"p0", b"p1", b"p2", b"p3"])
_ops = st.lists(st.one_of(
    st.tuples(st.just("add"), st.one_of(st.none(), st.integers(0, 6)), _pw, st.booleans()),
    st.tuples(st.just("erase"), st.integers(0, 6), st.booleans()),
    st.tuples(st.just("erase-by"), _pw, st.booleans()),
), min_size=1, max_size=5)


@settings(max_examples=12, deadline=None)
@given(ops=_ops)
def test_random_sequences_match_the_model(ops):
    """Each operation succeeds or fails as QEMU's rules say; the slots and their
    passphrases are what the model holds; the volume key never changes."""
    data = build(((0, b"p0"),))
    model = {0: b"p0"}
    key = opens(data, b"p0")
    for op in ops:
        opener = model[min(model)]
        expect_error = False
        if op[0] == "add":
            _, slot, pw, force = op
            target = slot if slot is not None else min(set(range(32)) - set(model))
            expect_error = (target in model and not force)
            space = len(model) + (0 if target in model else 1)
            expect_error = expect_error or space > 6
            options = dict(state="active", new_secret=pw, keyslot=slot, force=force)
        elif op[0] == "erase":
            _, slot, force = op
            expect_error = not force and (slot not in model or list(model) == [slot])
            options = dict(state="inactive", keyslot=slot, force=force)
        else:
            _, pw, force = op
            matching = {i for i, p in model.items() if p == pw}
            expect_error = not matching or (not force and matching == set(model))
            options = dict(state="inactive", old_secret=pw, force=force)
        try:
            data = amend(data, opener, **options)
        except CryptoError:
            assert expect_error, (op, model)
            continue
        assert not expect_error, (op, model)
        if op[0] == "add":
            model[target] = pw
        elif op[0] == "erase":
            model.pop(slot, None)
        else:
            model = {i: p for i, p in model.items() if p != pw}
        header = read_luks2(MemoryImageIO(data).read, detached_header=True)
        assert set(header.keyslots) == set(model)
        for index, pw in model.items():
            assert opens(data, pw, index) == key
        if not model:
            break


# -- interop: cryptsetup images --------------------------------------------------------

PW = {0: b"slot zero", 5: b"slot five", 31: b"slot thirty-one"}
CASES = {
    "pbkdf2-512-xts256": (("--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"),
                          "512", "256"),
    "argon2i-4096-xts512": (("--pbkdf", "argon2i", "--pbkdf-force-iterations", "4",
                             "--pbkdf-memory", "32", "--pbkdf-parallel", "1"), "4096", "512"),
    "argon2id-4096-xts256": (("--pbkdf", "argon2id", "--pbkdf-force-iterations", "4",
                              "--pbkdf-memory", "32", "--pbkdf-parallel", "2"), "4096", "256"),
}


def cryptsetup(*args) -> str:
    return run([require("cryptsetup"), *map(str, args)]).stdout.decode()


def key_file(directory: Path, passphrase: bytes) -> Path:
    path = directory / f"key-{passphrase.hex()}"
    path.write_bytes(passphrase)
    return path


@pytest.fixture(scope="module", params=sorted(CASES))
def cs_image(request, tmp_path_factory) -> tuple[Path, tuple[str, ...]]:
    require("cryptsetup")
    kdf, sector, bits = CASES[request.param]
    d = tmp_path_factory.mktemp("l2a")
    path = d / "img"
    with open(path, "wb") as f:
        f.truncate(17 * 1024 * 1024)
    cryptsetup("luksFormat", "--type", "luks2", "--batch-mode", *kdf, "--sector-size", sector,
               "--cipher", "aes-xts-plain64", "--key-size", bits,
               "--key-file", key_file(d, PW[0]), path)
    for slot in (5, 31):
        cryptsetup("luksAddKey", "--batch-mode", *kdf, "--key-slot", slot,
                   "--key-file", key_file(d, PW[0]), path, key_file(d, PW[slot]))
    return path, kdf


def epoch(path: Path) -> int:
    for line in cryptsetup("luksDump", path).splitlines():
        if line.startswith("Epoch:"):
            return int(line.split()[1])
    raise AssertionError("no epoch")


def cs_opens(path: Path, passphrase: bytes, slot: int) -> bool:
    proc = run([require("cryptsetup"), "open", "--test-passphrase", "--key-slot", str(slot),
                "--key-file", "-", str(path)], input=passphrase, check=False)
    return proc.returncode == 0


@pytest.mark.interop
def test_qmpd_amends_seen_by_cryptsetup(cs_image, tmp_path):
    source, kdf = cs_image
    path = tmp_path / "img"
    path.write_bytes(source.read_bytes())
    key = cryptsetup_volume_key(str(path), PW[0])
    start = epoch(path)
    original = json.loads(cryptsetup("luksDump", "--dump-json-metadata", path))

    # add (argon2id, fixed small costs) to the first free slot, 1
    path.write_bytes(amend(path.read_bytes(), PW[5], is_detached=False, state="active",
                           new_secret=b"qmpd one", pbkdf="argon2id", pbkdf_memory=32,
                           pbkdf_parallel=1))
    assert cs_opens(path, b"qmpd one", 1) and not cs_opens(path, b"qmpd one", 0)
    assert epoch(path) == start + 1
    assert cryptsetup_volume_key(str(path), b"qmpd one") == key
    meta = json.loads(cryptsetup("luksDump", "--dump-json-metadata", path))
    assert meta["digests"]["0"]["keyslots"] == ["0", "5", "31", "1"]
    ours, theirs = meta["keyslots"]["1"], original["keyslots"]["5"]
    assert [list(ours), list(ours["af"]), list(ours["area"])] == \
        [list(theirs), list(theirs["af"]), list(theirs["area"])]
    assert {k: v for k, v in ours["area"].items() if k != "offset"} == \
        {k: v for k, v in theirs["area"].items() if k != "offset"}
    assert ours["af"] == theirs["af"] and ours["key_size"] == theirs["key_size"]

    # the area is where cryptsetup itself would have put it
    twin = tmp_path / "twin"
    twin.write_bytes(source.read_bytes())
    cryptsetup("luksAddKey", "--batch-mode", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations",
               "1000", "--key-slot", "1", "--key-file", key_file(tmp_path, PW[0]), twin,
               key_file(tmp_path, b"twin"))
    twin_meta = json.loads(cryptsetup("luksDump", "--dump-json-metadata", twin))
    assert twin_meta["keyslots"]["1"]["area"] == ours["area"]

    # pbkdf2 to slot 7 with qmpd, then erase slot 5
    path.write_bytes(amend(path.read_bytes(), PW[0], is_detached=False, state="active",
                           new_secret=b"qmpd seven", keyslot=7, pbkdf="pbkdf2"))
    assert cs_opens(path, b"qmpd seven", 7)
    path.write_bytes(amend(path.read_bytes(), PW[0], is_detached=False, state="inactive",
                           keyslot=5))
    assert not cs_opens(path, PW[5], 5) and not cryptsetup_unlocks(str(path), PW[5])
    assert epoch(path) == start + 3
    for slot, pw in ((0, PW[0]), (31, PW[31]), (1, b"qmpd one"), (7, b"qmpd seven")):
        assert cs_opens(path, pw, slot), slot

    # forced overwrite of 31; cryptsetup adds and removes keys after our writes
    path.write_bytes(amend(path.read_bytes(), PW[0], is_detached=False, state="active",
                           new_secret=b"new 31", keyslot=31, force=True, pbkdf="pbkdf2"))
    assert cs_opens(path, b"new 31", 31) and not cryptsetup_unlocks(str(path), PW[31])
    cryptsetup("luksAddKey", "--batch-mode", *kdf, "--key-slot", "5",
               "--key-file", key_file(tmp_path, b"qmpd one"), path, key_file(tmp_path, b"cs5"))
    cryptsetup("luksKillSlot", "--batch-mode", path, "7")
    assert cs_opens(path, b"cs5", 5)
    assert opens(path.read_bytes(), b"cs5", 5, is_detached=False) == key
    assert opens(path.read_bytes(), b"qmpd seven", is_detached=False) is None
    assert cryptsetup_volume_key(str(path), b"new 31") == key
    cryptsetup("repair", "--batch-mode", path)   # nothing for cryptsetup to fix
    assert epoch(path) == start + 6
