"""The LUKS2 header reader: copies, checksums, JSON validation, hostile bytes,
and images made by cryptsetup."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmpd.crypto.errors import CryptoError
from qmpd.crypto.luks.luks2_header import (
    MAGIC_PRIMARY,
    MAGIC_SECONDARY,
    Argon2,
    Copy,
    CopyState,
    Luks2Header,
    Pbkdf2,
    read_luks2,
)
from tests import oracles

HDR = 16384
KS_SALT = "27mHGqnIbC+ur57/bJ7LHce38DFhzsXHKLJhHqbtB+0="
DG_SALT = "OmMuiVZnLTfwyK6XtmmSV1hgY2tVfhiMLnHcETNgX8o="
DG_DIGEST = "mXEO37Mnz/3blvylgO8xu0MoAs5uwDXeBFsIbB6K/rM="
SECRETS = (KS_SALT, DG_SALT, DG_DIGEST)


def metadata(hdr_size: int = HDR) -> dict:
    """Valid metadata as cryptsetup 2.6 writes it, with two keyslots."""
    def slot(offset: int, kdf: dict) -> dict:
        return {"type": "luks2", "key_size": 64,
                "af": {"type": "luks1", "stripes": 4000, "hash": "sha256"},
                "area": {"type": "raw", "offset": str(offset), "size": "258048",
                         "encryption": "aes-xts-plain64", "key_size": 64},
                "kdf": kdf}
    return {
        "keyslots": {
            "0": slot(2 * hdr_size, {"type": "pbkdf2", "hash": "sha256",
                                     "iterations": 1000, "salt": KS_SALT}),
            "1": slot(2 * hdr_size + 258048,
                      {"type": "argon2id", "time": 4, "memory": 32, "cpus": 2,
                       "salt": KS_SALT}),
        },
        "tokens": {},
        "segments": {"0": {"type": "crypt", "offset": "16777216", "size": "dynamic",
                           "iv_tweak": "0", "encryption": "aes-xts-plain64",
                           "sector_size": 512}},
        "digests": {"0": {"type": "pbkdf2", "keyslots": ["0", "1"], "segments": ["0"],
                          "hash": "sha256", "iterations": 1000, "salt": DG_SALT,
                          "digest": DG_DIGEST}},
        "config": {"json_size": str(hdr_size - 4096),
                   "keyslots_size": str(16777216 - 2 * hdr_size)},
    }


def copy_bytes(meta: dict | bytes, *, secondary: bool = False, hdr_size: int = HDR,
               seqid: int = 1, label: bytes = b"", version: int = 2,
               hdr_offset: int | None = None, alg: bytes = b"sha256") -> bytes:
    """One header copy (binary header + JSON area) with a correct checksum."""
    text = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
    area = text.ljust(hdr_size - 4096, b"\0")[:hdr_size - 4096]
    if hdr_offset is None:
        hdr_offset = hdr_size if secondary else 0
    binary = bytearray(4096)
    struct.pack_into(">6sHQQ48s32s64s40s48sQ", binary, 0,
                     MAGIC_SECONDARY if secondary else MAGIC_PRIMARY, version, hdr_size,
                     seqid, label, alg, b"\x5a" * 64,
                     b"3b4b1f5e-2a43-4d7a-9d53-6a8e2b2f0c11", b"", hdr_offset)
    name = alg.decode()
    if name in hashlib.algorithms_available:
        csum = hashlib.new(name, bytes(binary) + area).digest()
        binary[448:448 + len(csum)] = csum
    return bytes(binary) + area


def image(meta: dict | None = None, *, seqids: tuple[int, int] = (1, 1),
          hdr_size: int = HDR, **kw) -> bytearray:
    meta = metadata(hdr_size) if meta is None else meta
    return bytearray(copy_bytes(meta, hdr_size=hdr_size, seqid=seqids[0], **kw)
                     + copy_bytes(meta, secondary=True, hdr_size=hdr_size,
                                  seqid=seqids[1], **kw))


def reader(data: bytes | bytearray):
    data = bytes(data)
    return lambda offset, length: data[offset:offset + length]


def parse(data) -> Luks2Header:
    return read_luks2(reader(data))


def refused(data) -> str:
    with pytest.raises(CryptoError) as info:
        parse(data)
    text = str(info.value)
    for secret in SECRETS:
        assert secret not in text
    return text


# -- copies ----------------------------------------------------------------------

def test_valid_header_parsed():
    h = parse(image(label=b"my volume"))
    assert (h.seqid, h.hdr_size, h.label, h.copy, h.other_copy) == (
        1, HDR, "my volume", Copy.PRIMARY, CopyState.CURRENT)
    assert h.uuid == "3b4b1f5e-2a43-4d7a-9d53-6a8e2b2f0c11"
    assert h.checksum_alg == "sha256"
    assert sorted(h.keyslots) == [0, 1]
    slot = h.keyslots[0]
    assert (slot.key_size, slot.area.offset, slot.area.size, slot.area.encryption,
            slot.af_stripes, slot.af_hash, slot.priority) == (
        64, 2 * HDR, 258048, "aes-xts-plain64", 4000, "sha256", None)
    assert slot.kdf == Pbkdf2(hash="sha256", iterations=1000, salt=base64.b64decode(KS_SALT))
    kdf = h.keyslots[1].kdf
    assert isinstance(kdf, Argon2)
    assert (kdf.type, kdf.time, kdf.memory, kdf.cpus) == ("argon2id", 4, 32, 2)
    seg = h.segments[0]
    assert (seg.offset, seg.size, seg.iv_tweak, seg.sector_size) == (16777216, None, 0, 512)
    assert h.digests[0].keyslots == (0, 1) and h.digests[0].segments == (0,)
    assert h.config.json_size == HDR - 4096
    assert h.config.requirements_mandatory == ()
    assert h.keyslots_end == h.data_offset == 16777216


def test_reprs_hold_no_salts_or_digests():
    text = repr(parse(image()))
    assert "salt" not in text and "digest=" not in text
    for secret in SECRETS:
        assert secret not in text


@pytest.mark.parametrize("seqids, used, other", [
    ((5, 5), Copy.PRIMARY, CopyState.CURRENT),
    ((6, 5), Copy.PRIMARY, CopyState.STALE),
    ((5, 7), Copy.SECONDARY, CopyState.STALE),
])
def test_higher_seqid_wins_primary_on_tie(seqids, used, other):
    h = parse(image(seqids=seqids))
    assert (h.copy, h.other_copy, h.seqid) == (used, other, max(seqids))


def test_bad_primary_checksum_falls_back_to_secondary():
    data = image(seqids=(9, 3))
    data[448] ^= 1
    h = parse(data)
    assert (h.copy, h.other_copy, h.seqid) == (Copy.SECONDARY, CopyState.BAD, 3)


def test_bad_primary_json_falls_back_to_secondary():
    bad = metadata()
    del bad["config"]
    data = bytearray(copy_bytes(bad, seqid=9) + copy_bytes(metadata(), secondary=True))
    h = parse(data)
    assert (h.copy, h.other_copy) == (Copy.SECONDARY, CopyState.BAD)


@pytest.mark.parametrize("hdr_size", [0x4000, 0x10000, 0x400000])
def test_secondary_is_probed_when_primary_is_gone(hdr_size):
    data = image(hdr_size=hdr_size)
    data[:4096] = bytes(4096)
    h = parse(data)
    assert (h.copy, h.other_copy, h.hdr_size) == (Copy.SECONDARY, CopyState.MISSING, hdr_size)


def test_missing_and_bad_secondary_reported():
    data = image()
    h = parse(data[:HDR])
    assert (h.copy, h.other_copy) == (Copy.PRIMARY, CopyState.MISSING)
    data[HDR + 448] ^= 1
    h = parse(data)
    assert (h.copy, h.other_copy) == (Copy.PRIMARY, CopyState.BAD)


def test_both_copies_bad_reports_the_primary():
    data = image()
    data[448] ^= 1
    data[HDR + 448] ^= 1
    assert refused(data) == "LUKS2 primary header checksum does not match"


def test_not_luks():
    assert "not in LUKS2 format" in refused(bytes(64 * 1024))
    assert "not in LUKS2 format" in refused(b"")


# -- the binary header ------------------------------------------------------------

@pytest.mark.parametrize("kw, text", [
    (dict(version=1), "LUKS version 1 is not supported"),
    (dict(hdr_offset=512), "header offset 512 does not match its location 0"),
    (dict(alg=b"md5"), "unsupported checksum algorithm 'md5'"),
])
def test_binary_header_rules(kw, text):
    data = copy_bytes(metadata(), **kw) + copy_bytes(metadata(), secondary=True, **kw)
    assert text in refused(data)


def test_labels_are_utf8():
    assert parse(image(label="café".encode())).label == "café"
    assert parse(image(label=b"\xff")).label == "\ufffd"


@pytest.mark.parametrize("hdr_size", [0, 4096, 0x6000, 0x800000])
def test_unsupported_header_size(hdr_size):
    data = bytearray(image())
    struct.pack_into(">Q", data, 8, hdr_size)
    assert f"unsupported header size {hdr_size}" in refused(data[:HDR])


def test_checksum_over_the_whole_json_area():
    data = image()
    data[HDR - 1] ^= 1          # the last byte of the primary's JSON area
    h = parse(data)
    assert h.copy is Copy.SECONDARY and h.other_copy is CopyState.BAD


def test_truncated_json_area():
    assert "truncated" in refused(image()[:HDR - 1])


@pytest.mark.parametrize("raw, text", [
    (b"{" * 12288, "not NUL terminated"),
    (b"{\"keyslots\": }", "does not hold valid JSON"),
    (b"[1]", "does not start with '{'"),
    (b"{\"a\": 1, \"a\": 2}", "duplicate key 'a'"),
    (b"{\"a\": NaN}", "non-JSON number"),
    (b"{\"a\": \"\xff\"}", "does not hold valid JSON"),
    (b"{\"a\":" + b"[" * 5000 + b"]" * 5000 + b"}", "does not hold valid JSON"),
    (b" " + json.dumps(metadata()).encode(), "does not start with '{'"),
    (json.dumps(metadata()).encode() + b"\0\0junk", "data after the terminating NUL"),
    (json.dumps(metadata()).encode() + b"\f", "does not hold valid JSON"),
])
def test_json_area_rules(raw, text):
    data = copy_bytes(raw) + copy_bytes(raw, secondary=True)
    assert text in refused(data)


@pytest.mark.parametrize("arrays, accepted", [(28, True), (29, False)])
def test_json_nesting_limit_is_json_cs(arrays, accepted):
    """cryptsetup 2.6 (json-c's depth 32) loads a token 28 arrays deep (31
    levels with the root, tokens and the token) and refuses 29, measured
    with ``cryptsetup token import`` + luksDump; whatever the interpreter's
    own recursion limit (Python 3.13 parses far deeper)."""
    meta = metadata()
    value: object = 1
    for _ in range(arrays):
        value = [value]
    meta["tokens"] = {"0": {"type": "x-deep", "keyslots": [], "v": value}}
    data = image(meta)
    if accepted:
        assert parse(data).tokens[0]["type"] == "x-deep"
    else:
        assert "does not hold valid JSON" in refused(data)


def test_whitespace_after_the_json_is_allowed():
    raw = json.dumps(metadata()).encode() + b" \t\r\n"
    assert sorted(parse(copy_bytes(raw) + copy_bytes(raw, secondary=True)).keyslots) == [0, 1]


def test_a_luks1_primary_is_not_passed_over_for_a_secondary():
    """cryptsetup refuses a LUKS2 load when the primary says version 1; any
    other version is only a bad copy."""
    data = bytearray(image())
    struct.pack_into(">H", data, 6, 1)
    assert "LUKS version 1 is not supported" in refused(data)
    struct.pack_into(">H", data, 6, 3)
    h = parse(data)
    assert (h.copy, h.other_copy) == (Copy.SECONDARY, CopyState.BAD)


# -- the JSON metadata ------------------------------------------------------------

def _set(path: str, value):
    def mutate(meta):
        *parents, last = path.split("/")
        node = meta
        for name in parents:
            node = node[name]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value
    return mutate


_DELETE = object()
K0, K1 = "keyslots/0", "keyslots/1"
S0, D0 = "segments/0", "digests/0"


def _dynamic_first(meta):
    meta["segments"]["1"] = dict(meta["segments"]["0"], offset="33554432")
    meta["digests"]["0"]["segments"].append("1")


def _gap(meta):
    meta["segments"]["2"] = dict(meta["segments"]["0"], offset="33554432")
    meta["digests"]["0"]["segments"].append("2")


def _overlapping_segments(meta):
    meta["segments"]["0"]["size"] = "1048576"
    meta["segments"]["1"] = dict(meta["segments"]["0"], offset="17301504")
    meta["digests"]["0"]["segments"].append("1")


def _unassigned_keyslot(meta):
    meta["digests"]["0"]["keyslots"] = ["0"]


def _keyslot_in_two_digests(meta):
    meta["digests"]["1"] = dict(meta["digests"]["0"], keyslots=["1"], segments=[])


def _second_digest_only_slot(meta):
    meta["digests"]["0"]["segments"] = []


RULES = [
    (_set("keyslots", _DELETE), "LUKS2 metadata has no 'keyslots'"),
    (_set("tokens", []), "'tokens' is not an object"),
    (_set("segments", _DELETE), "has no 'segments'"),
    (_set("digests", "x"), "'digests' is not an object"),
    (_set("config", _DELETE), "has no 'config'"),
    (_set("config/json_size", 12288), "json_size' is not a string of decimal digits"),
    (_set("config/json_size", "28672"), "json_size 28672 does not match the header size"),
    (_set("config/json_size", "-12288"), "not a string of decimal digits"),
    (_set("config/json_size", "١٢"), "not a string of decimal digits"),
    (_set("config/keyslots_size", "16744449"), "is not a multiple of 4096"),
    (_set("config/keyslots_size", "99999999999999999999999"), "does not fit in 64 bits"),
    (_set("config/keyslots_size", str(256 << 20)), "is larger than"),
    (_set("config/flags", [1]), "'flags' is not an array of strings"),
    (_set("config/requirements", {"mandatory": "x"}), "'mandatory' is not an array"),
    (_set("keyslots/32", {}), "LUKS2 keyslots id 32 is out of range [0, 31]"),
    (_set("keyslots/a", {}), "LUKS2 keyslots id 'a' is not a decimal number"),
    (_set("keyslots/01", {}), "not in canonical form"),
    (_set(K0 + "/type", "reencrypt"), "LUKS2 keyslot 0 type 'reencrypt' is not supported"),
    (_set(K0 + "/key_size", "64"), "LUKS2 keyslot 0 'key_size' is not an integer"),
    (_set(K0 + "/key_size", True), "'key_size' is not an integer"),
    (_set(K0 + "/key_size", 0), "key_size 0 is out of range"),
    (_set(K0 + "/priority", 3), "priority 3 is out of range"),
    (_set(K0 + "/area/type", "none"), "keyslot 0 area type 'none' is not supported"),
    (_set(K0 + "/area/offset", 32768), "area 'offset' is not a string of decimal digits"),
    (_set(K0 + "/area/size", "4096"), "area size 4096 is too small for a 64-byte key"),
    (_set(K0 + "/area/encryption", ""), "'encryption' is not a non-empty string"),
    (_set(K0 + "/area/key_size", _DELETE), "area has no 'key_size'"),
    (_set(K0 + "/area/offset", "16384"), "keyslot 0 area is outside the keyslots area"),
    (_set(K0 + "/area/offset", "16777216"), "keyslot 0 area is outside the keyslots area"),
    (_set(K1 + "/area/offset", "40960"), "LUKS2 keyslot 1 area overlaps keyslot 0"),
    (_set(K0 + "/kdf/type", "scrypt"), "kdf type 'scrypt' is not supported"),
    (_set(K0 + "/kdf/iterations", 0), "iterations 0 is out of range"),
    (_set(K0 + "/kdf/iterations", 1 << 40), "iterations 1099511627776 is out of range"),
    (_set(K0 + "/kdf/iterations", 1000.0), "'iterations' is not an integer"),
    (_set(K0 + "/kdf/salt", "not base64!"), "kdf 'salt' is not valid base64"),
    (_set(K0 + "/kdf/salt", ""), "kdf 'salt' has an unsupported length"),
    (_set(K0 + "/kdf/hash", _DELETE), "kdf has no 'hash'"),
    (_set(K1 + "/kdf/memory", 4194305), "memory 4194305 is out of range [8, 4194304]"),
    (_set(K1 + "/kdf/memory", 8), "memory 8 is too small for 2 cpus"),
    (_set(K1 + "/kdf/time", 0), "time 0 is out of range"),
    (_set(K1 + "/kdf/time", 1 << 33), "time 8589934592 is out of range"),
    (_set(K1 + "/kdf/cpus", 0), "cpus 0 is out of range"),
    (_set(K1 + "/kdf/salt", 5), "'salt' is not a base64 string"),
    (_set(K0 + "/af/type", "luks2"), "af type 'luks2' is not supported"),
    (_set(K0 + "/af/stripes", 3999), "af stripes must be 4000"),
    (_set(K0 + "/af/hash", _DELETE), "af has no 'hash'"),
    (_unassigned_keyslot, "LUKS2 keyslot 1 is not assigned to any digest"),
    (_keyslot_in_two_digests, "LUKS2 keyslot 1 is assigned to more than one digest"),
    (_set(K0 + "/type", None), "LUKS2 keyslot 0 type null is not supported"),
    (_set(S0 + "/type", {"a": 1}), 'LUKS2 segment 0 type {"a": 1} is not supported'),
    (_second_digest_only_slot, "LUKS2 segment 0 is not assigned to any digest"),
    (_set(D0 + "/type", "sha"), "digest 0 type 'sha' is not supported"),
    (_set(D0 + "/keyslots", ["0", "1", "5"]), "digest 0 references a missing keyslot '5'"),
    (_set(D0 + "/keyslots", ["0", "1", "1"]), "lists a keyslot twice"),
    (_set(D0 + "/keyslots", "0"), "'keyslots' is not an array of strings"),
    (_set(D0 + "/segments", ["1"]), "references a missing segment '1'"),
    (_set(D0 + "/digest", "@@@@"), "digest 0 'digest' is not valid base64"),
    (_set(D0 + "/iterations", -1), "iterations -1 is out of range"),
    (_set("digests/x", {}), "LUKS2 digests id 'x' is not a decimal number"),
    (_set("segments", {}), "LUKS2 segments section is empty"),
    (_set(S0 + "/type", "linear"), "segment 0 type 'linear' is not supported"),
    (_set(S0 + "/offset", "1024"), "LUKS2 segment 0 offset 1024 overlaps the metadata"),
    (_set(S0 + "/offset", "16777217"), "offset 16777217 is not a multiple of 512"),
    (_set(S0 + "/size", "0"), "segment 0 size is zero"),
    (_set(S0 + "/size", "Dynamic"), "'size' is not a string of decimal digits"),
    (_set(S0 + "/size", "1536"), "size 1536 is not a multiple of the sector size 1024"),
    (_set(S0 + "/iv_tweak", 0), "'iv_tweak' is not a string of decimal digits"),
    (_set(S0 + "/encryption", _DELETE), "segment 0 has no 'encryption'"),
    (_set(S0 + "/sector_size", 8192), "sector_size must be 512, 1024, 2048 or 4096"),
    (_set(S0 + "/sector_size", 768), "sector_size must be 512"),
    (_set(S0 + "/flags", "x"), "segment 0 'flags' is not an array of strings"),
    (_set(S0 + "/integrity", {"type": "hmac"}), "integrity has no 'journal_encryption'"),
    (_gap, "LUKS2 segments have a gap at id 1"),
    (_dynamic_first, "LUKS2 segment 0 is 'dynamic' but not the last segment"),
    (_overlapping_segments, "LUKS2 segment 1 overlaps segment 0"),
    (_set("tokens/0", {"type": "luks2-keyring", "keyslots": ["7"]}),
     "LUKS2 token 0 references a missing keyslot '7'"),
    (_set("tokens/0", {"keyslots": []}), "LUKS2 token 0 has no 'type'"),
    (_set("tokens/40", {}), "LUKS2 tokens id 40 is out of range"),
]


@pytest.mark.parametrize("mutate, text", RULES, ids=[t for _, t in RULES])
def test_metadata_rule_refused(mutate, text):
    meta = copy.deepcopy(metadata())
    if "1536" in text:
        meta["segments"]["0"]["sector_size"] = 1024
    mutate(meta)
    message = refused(image(meta))
    assert text in message, message
    assert message.startswith("LUKS2 ")


def test_segment_size_up_to_uint64_max_is_accepted():
    """cryptsetup's uint64-max-segment-size case: the end is past 2^64, the
    open (not the header) refuses a segment longer than the image."""
    meta = metadata()
    meta["segments"]["0"]["size"] = str((1 << 64) - 512)
    assert parse(image(meta)).segments[0].size == (1 << 64) - 512


def test_detached_header_allows_segment_at_zero():
    meta = metadata()
    meta["segments"]["0"]["offset"] = "0"
    assert "overlaps the metadata" in refused(image(meta))
    h = read_luks2(reader(image(meta)), detached_header=True)
    assert h.segments[0].offset == 0


def test_optional_fields_kept():
    meta = metadata()
    meta["keyslots"]["0"]["priority"] = 2
    meta["config"]["flags"] = ["allow-discards"]
    meta["config"]["requirements"] = {"mandatory": ["online-reencrypt-v2"]}
    meta["tokens"]["3"] = {"type": "systemd-tpm2", "keyslots": ["1"], "extra": [1, {}]}
    meta["segments"]["0"]["size"] = "1048576"
    h = parse(image(meta))
    assert h.keyslots[0].priority == 2
    assert h.config.flags == ("allow-discards",)
    assert h.config.requirements_mandatory == ("online-reencrypt-v2",)
    assert h.tokens == {3: meta["tokens"]["3"]}
    assert h.segments[0].size == 1048576


# -- hostile bytes ----------------------------------------------------------------

VALID = bytes(image(seqids=(2, 1)))
VALID_JSON = json.dumps(metadata()).encode()


PYTHON_NAME = re.compile(r"Traceback|\b[A-Za-z_]*(?:Error|Exception)\b|\bNone\b|<[a-z]")


def _outcome(data) -> None:
    """A header, or a CryptoError whose text is a clear sentence."""
    try:
        h = parse(data)
    except CryptoError as err:
        text = str(err)
        assert text.strip() and not PYTHON_NAME.search(text), text
        return
    assert isinstance(h, Luks2Header)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(1, 255)),
                max_size=8),
       st.integers(0, len(VALID)))
def test_flipped_or_truncated_bytes_only_raise_crypto_error(flips, length):
    data = bytearray(VALID)
    for offset, mask in flips:
        data[offset] ^= mask
    _outcome(data[:length])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(VALID_JSON) - 1), st.binary(max_size=3)),
                min_size=1, max_size=4))
def test_edited_json_with_a_valid_checksum_only_raises_crypto_error(edits):
    text = bytearray(VALID_JSON)
    for offset, replacement in edits:
        text[offset:offset + 1] = replacement
    raw = bytes(text)
    _outcome(copy_bytes(raw) + copy_bytes(raw, secondary=True))


def _leaves(node, path=()):
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from _leaves(value, path + (key,))
    elif isinstance(node, list) and node:
        for i, value in enumerate(node):
            yield from _leaves(value, path + (i,))
    yield path


PATHS = [p for p in _leaves(metadata()) if p]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats(allow_nan=False)
    | st.text(max_size=8) | st.sampled_from(["0", "dynamic", "4096", "18446744073709551616"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                 max_size=3),
    max_leaves=6)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(PATHS), JSON_VALUES)
def test_any_value_anywhere_only_raises_crypto_error(path, value):
    meta = metadata()
    node = meta
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    _outcome(image(meta))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 4095), st.integers(1, 255)), min_size=1,
                max_size=6), st.booleans())
def test_binary_header_flips_with_a_valid_checksum_only_raise_crypto_error(flips, both):
    """Flips anywhere in the binary header but its checksum, which is then
    recomputed (over the flipped algorithm name when it still names one)."""
    copies = []
    for start in (0, HDR):
        copy = bytearray(VALID[start:start + HDR])
        if start == 0 or both:
            for offset, mask in flips:
                if not 448 <= offset < 512:
                    copy[offset] ^= mask
        alg = bytes(copy[72:104]).split(b"\0", 1)[0].decode("ascii", "replace")
        if alg in hashlib.algorithms_available and alg in ("sha1", "sha256", "sha384", "sha512"):
            copy[448:512] = bytes(64)
            digest = hashlib.new(alg, bytes(copy)).digest()
            copy[448:448 + len(digest)] = digest
        copies.append(bytes(copy))
    _outcome(copies[0] + copies[1])


def _retype(value):
    """The same information in another JSON type."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return int(value) if value.isdigit() else [value]
    if isinstance(value, list):
        return {str(i): v for i, v in enumerate(value)}
    if isinstance(value, dict):
        return list(value.values())
    return "null"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 10 ** 6), st.sampled_from(["delete", "retype",
                                                                    "replace", "copy"]),
                          JSON_VALUES), min_size=1, max_size=4))
def test_deleted_retyped_or_copied_members_only_raise_crypto_error(edits):
    meta = metadata()
    for choice, op, value in edits:
        paths = [p for p in _leaves(meta) if p]
        if not paths:
            break
        *parents, last = paths[choice % len(paths)]
        node = meta
        for key in parents:
            node = node[key]
        if op == "delete":
            del node[last]
        elif op == "retype":
            node[last] = _retype(node[last])
        elif op == "replace":
            node[last] = value
        elif isinstance(node, dict):       # the member again under a numbered key
            node[str(choice % 40)] = copy.deepcopy(node[last])
    _outcome(image(meta))


# -- interop with cryptsetup ------------------------------------------------------

def _cryptsetup_image(tmp_path, name: str, *extra: str) -> tuple[bytes, str]:
    oracles.require("cryptsetup")
    path = tmp_path / name
    key = tmp_path / "key"
    key.write_bytes(b"correct horse")
    with open(path, "wb") as f:
        f.truncate(16 * 1024 * 1024)
    oracles.run(["cryptsetup", "luksFormat", "--type", "luks2", "--batch-mode",
                 "--key-file", str(key), *extra, str(path)])
    return path.read_bytes(), str(path)


def _dump_json(path: str) -> dict | None:
    help_text = oracles.run(["cryptsetup", "luksDump", "--help"], check=False).stdout
    if b"--dump-json-metadata" not in help_text:
        return None
    return json.loads(oracles.run(["cryptsetup", "luksDump", "--dump-json-metadata",
                                   path]).stdout)


def _dump_fields(path: str) -> dict[str, str]:
    fields = {}
    for line in oracles.run(["cryptsetup", "luksDump", path]).stdout.decode().splitlines():
        if ":" in line and not line.startswith(("\t", " ")):
            key, value = line.split(":", 1)
            fields[key.strip()] = value.strip()
    return fields


def _compare(h: Luks2Header, path: str) -> None:
    fields = _dump_fields(path)
    assert fields["Version"] == "2"
    assert int(fields["Epoch"]) == h.seqid
    assert fields["Metadata area"] == f"{h.hdr_size} [bytes]"
    assert fields["Keyslots area"] == f"{h.config.keyslots_size} [bytes]"
    assert fields["UUID"] == h.uuid
    assert fields["Label"] == (h.label or "(no label)")
    dump = _dump_json(path)
    if dump is None:
        return
    assert dump == h.metadata
    assert sorted(h.keyslots) == sorted(int(k) for k in dump["keyslots"])
    for key, raw in dump["keyslots"].items():
        slot = h.keyslots[int(key)]
        assert slot.key_size == raw["key_size"]
        assert slot.area.offset == int(raw["area"]["offset"])
        assert slot.area.size == int(raw["area"]["size"])
        assert slot.area.encryption == raw["area"]["encryption"]
        assert slot.kdf.type == raw["kdf"]["type"]
        if isinstance(slot.kdf, Pbkdf2):
            assert slot.kdf.iterations == raw["kdf"]["iterations"]
        else:
            assert (slot.kdf.time, slot.kdf.memory, slot.kdf.cpus) == (
                raw["kdf"]["time"], raw["kdf"]["memory"], raw["kdf"]["cpus"])
    for key, raw in dump["segments"].items():
        seg = h.segments[int(key)]
        assert seg.offset == int(raw["offset"])
        assert seg.sector_size == raw["sector_size"]
        assert seg.encryption == raw["encryption"]
    for key, raw in dump["digests"].items():
        assert h.digests[int(key)].keyslots == tuple(int(k) for k in raw["keyslots"])


PBKDF2 = ("--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000")


@pytest.mark.interop
@pytest.mark.parametrize("name, extra", [
    ("pbkdf2", PBKDF2),
    ("argon2id", ("--pbkdf", "argon2id", "--pbkdf-memory", "32",
                  "--pbkdf-force-iterations", "4")),
    ("sector4096", PBKDF2 + ("--sector-size", "4096")),
    ("sector512", PBKDF2 + ("--sector-size", "512")),
    ("label", PBKDF2 + ("--label", "qmpd test volume")),
    ("metadata64k", PBKDF2 + ("--luks2-metadata-size", "64k",
                              "--luks2-keyslots-size", "4m")),
])
def test_cryptsetup_images(tmp_path, name, extra):
    data, path = _cryptsetup_image(tmp_path, name + ".img", *extra)
    h = parse(data)
    assert (h.copy, h.other_copy) == (Copy.PRIMARY, CopyState.CURRENT)
    _compare(h, path)
    if name == "argon2id":
        assert isinstance(h.keyslots[0].kdf, Argon2)
        assert (h.keyslots[0].kdf.memory, h.keyslots[0].kdf.time) == (32, 4)
    if name.startswith("sector"):
        assert h.segments[0].sector_size == int(name[6:])
    if name == "label":
        assert h.label == "qmpd test volume"
    if name == "metadata64k":
        assert h.hdr_size == 65536 and h.config.keyslots_size == 4 << 20


@pytest.mark.interop
def test_cryptsetup_added_key_and_damaged_primary(tmp_path):
    data, path = _cryptsetup_image(tmp_path, "two.img", *PBKDF2)
    new_key = tmp_path / "key2"
    new_key.write_bytes(b"battery staple")
    oracles.run(["cryptsetup", "luksAddKey", "--batch-mode", *PBKDF2,
                 "--key-file", str(tmp_path / "key"), path, str(new_key)])
    with open(path, "rb") as f:
        data = f.read()
    h = parse(data)
    assert sorted(h.keyslots) == [0, 1]
    _compare(h, path)
    # Wipe the primary's binary header: the secondary is found by probing,
    # and cryptsetup agrees that the volume is still usable.
    with open(path, "r+b") as f:
        f.write(bytes(4096))
        f.seek(0)
        damaged = f.read()
    h2 = parse(damaged)
    assert (h2.copy, h2.other_copy, h2.seqid) == (Copy.SECONDARY, CopyState.MISSING, h.seqid)
    assert h2.keyslots == h.keyslots
    oracles.run(["cryptsetup", "isLuks", "--type", "luks2", path])
