"""LUKS2 metadata writing: byte-exact with cryptsetup, both copies, repair, refusal."""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmpd.crypto.errors import CryptoError
from qmpd.crypto.luks.luks2_header import Copy, CopyState, read_luks2
from qmpd.crypto.luks.luks2_write import (
    apply_steps,
    json_text,
    other_copy_salt,
    plan_metadata_write,
)
from tests.oracles import require, run

HDR = 16384
SALT = slice(104, 168)


def cryptsetup(*args) -> str:
    return run([require("cryptsetup"), *map(str, args)]).stdout.decode()


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> bytes:
    """A cryptsetup LUKS2 image with two keyslots and a token of awkward strings."""
    require("cryptsetup")
    d = tmp_path_factory.mktemp("l2w")
    path, key = d / "img", d / "key"
    key.write_bytes(b"pw")
    with open(path, "wb") as f:
        f.truncate(17 * 1024 * 1024)
    cryptsetup("luksFormat", "--type", "luks2", "--batch-mode", "--key-file", key,
               "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--label", "lab", path)
    token = {"type": "qmpd-test", "keyslots": ["0"],
             "text": "a/b \"q\" \\ \u00e9\u4e2d \x01\x1f\t\n\x7f", "n": 12345678901}
    (d / "token.json").write_text(json.dumps(token))
    cryptsetup("token", "import", "--json-file", d / "token.json", path)
    return path.read_bytes()


def reader(data: bytes | bytearray):
    return lambda offset, length: bytes(data[offset:offset + length])


def written(data: bytes, plan) -> bytearray:
    out = bytearray(data)

    def write(offset: int, chunk: bytes) -> None:
        out[offset:offset + len(chunk)] = chunk
    apply_steps(plan.steps, write, lambda: None)
    return out


@pytest.mark.interop
def test_json_text_is_cryptsetups_byte_for_byte(image):
    header = read_luks2(reader(image))
    text = json_text(header.metadata)
    area = image[4096:HDR]
    assert area[:len(text)] == text and not any(area[len(text):])
    assert image[HDR + 4096:2 * HDR] == area


@pytest.mark.interop
def test_rewrite_same_metadata(image, tmp_path):
    header = read_luks2(reader(image))
    plan = plan_metadata_write(header, header.metadata,
                               other_salt=other_copy_salt(header, reader(image)))
    assert plan.header.seqid == header.seqid + 1
    # cryptsetup's order: binary without csum, JSON, binary with csum, sync; primary first.
    assert [s if s is None else s[0] for s in plan.steps] == [
        0, 4096, 0, None, HDR, HDR + 4096, HDR, None]
    assert plan.steps[0][1][448:512] == bytes(64) and plan.steps[2][1][448:480] != bytes(32)
    new = written(image, plan)
    # Only seqid and csum change; each copy keeps its salt.
    diff = [i for i in range(2 * HDR) if new[i] != image[i]]
    assert all(16 <= i < 24 or 448 <= i < 512 or HDR + 16 <= i < HDR + 24
               or HDR + 448 <= i < HDR + 512 for i in diff)
    again = read_luks2(reader(new))
    assert (again.seqid, again.other_copy, again.metadata) == (
        header.seqid + 1, CopyState.CURRENT, header.metadata)
    assert new[4096:HDR] == new[HDR + 4096:2 * HDR]
    path = tmp_path / "img"
    path.write_bytes(new)
    cryptsetup("isLuks", "--type", "luks2", path)
    dump = cryptsetup("luksDump", path)
    assert f"Epoch:         \t{header.seqid + 1}\n" in dump
    assert "Label:         \tlab\n" in dump
    meta = json.loads(cryptsetup("luksDump", "--dump-json-metadata", path))
    assert meta == header.metadata


@pytest.mark.interop
@pytest.mark.parametrize("damage", ["secondary bad", "secondary missing", "primary bad"])
def test_a_damaged_copy_is_repaired(image, tmp_path, damage):
    data = bytearray(image)
    if damage == "secondary bad":
        data[HDR + 5000] ^= 1
    elif damage == "secondary missing":
        data[HDR:2 * HDR] = bytes(HDR)
    else:
        data[5000] ^= 1
    header = read_luks2(reader(data))
    assert header.other_copy is (CopyState.MISSING if "missing" in damage else CopyState.BAD)
    assert header.copy is (Copy.SECONDARY if "primary" in damage else Copy.PRIMARY)
    metadata = copy.deepcopy(header.metadata)
    metadata["tokens"]["0"]["extra"] = "x"
    plan = plan_metadata_write(header, metadata, other_salt=other_copy_salt(header, reader(data)))
    new = written(data, plan)
    after = read_luks2(reader(new))
    assert (after.copy, after.other_copy, after.metadata) == (
        Copy.PRIMARY, CopyState.CURRENT, metadata)
    kept, fresh = (HDR, 0) if "primary" in damage else (0, HDR)
    assert new[kept + 104:kept + 168] == image[kept + 104:kept + 168]
    assert new[fresh + 104:fresh + 168] != image[fresh + 104:fresh + 168]
    assert new[4096:HDR] == new[HDR + 4096:2 * HDR]
    path = tmp_path / "img"
    path.write_bytes(new)
    assert json.loads(cryptsetup("luksDump", "--dump-json-metadata", path)) == metadata


@pytest.mark.interop
def test_invalid_metadata_is_refused(image):
    header = read_luks2(reader(image))
    bad = copy.deepcopy(header.metadata)
    bad["digests"]["0"]["keyslots"].append("7")
    with pytest.raises(CryptoError, match="^Refusing to write invalid LUKS2 metadata: "
                                          ".*missing keyslot"):
        plan_metadata_write(header, bad, other_salt=None)
    overlapping = copy.deepcopy(header.metadata)
    overlapping["keyslots"]["1"] = copy.deepcopy(overlapping["keyslots"]["0"])
    overlapping["digests"]["0"]["keyslots"].append("1")
    with pytest.raises(CryptoError, match="overlaps keyslot 0"):
        plan_metadata_write(header, overlapping, other_salt=None)
    huge = copy.deepcopy(header.metadata)
    huge["tokens"]["0"]["pad"] = "x" * HDR
    with pytest.raises(CryptoError, match="does not fit in the 12288-byte JSON area"):
        plan_metadata_write(header, huge, other_salt=None)


_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64) | _text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=12)


@pytest.mark.interop
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(extra=st.dictionaries(_text.filter(lambda k: k not in ("type", "keyslots")), _json,
                             max_size=4))
def test_any_token_content_round_trips(image, extra):
    header = read_luks2(reader(image))
    metadata = copy.deepcopy(header.metadata)
    metadata["tokens"]["0"].update(extra)
    metadata["unknown top-level"] = extra
    plan = plan_metadata_write(header, metadata, other_salt=None)
    after = read_luks2(reader(written(image, plan)))
    assert after.metadata == metadata
    assert list(after.metadata) == list(metadata)
