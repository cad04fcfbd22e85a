"""The LUKS2 on-disk header: read both copies, pick one, validate its JSON.

Theory of operation
-------------------
A LUKS2 device starts with two copies of the *metadata*, each ``hdr_size``
bytes long (16 KiB to 4 MiB, a power of two): the primary at offset 0 and
the secondary right after it, at offset ``hdr_size``. Each copy is a
4096-byte binary header followed by a JSON area of ``hdr_size - 4096``
bytes holding a NUL-terminated JSON text. After both copies comes the
keyslots area, ``[2 * hdr_size, 2 * hdr_size + keyslots_size)``, and then
the encrypted data (the segments).

The binary header (all integers big-endian; cryptsetup's
docs/on-disk-format-luks2.pdf)::

    0    magic "LUKS\\xba\\xbe" (primary) / "SKUL\\xba\\xbe" (secondary)  6
    6    version (2)                                                     2
    8    hdr_size: bytes of this copy, binary header + JSON area         8
    16   seqid: incremented by every update                              8
    24   label                                                          48
    72   checksum_alg ("sha256")                                        32
    104  salt                                                           64
    168  uuid                                                           40
    208  subsystem                                                      48
    256  hdr_offset: where this copy sits on the device                  8
    264  padding                                                       184
    448  csum: checksum_alg over the whole copy with this field zeroed  64
    512  padding to 4096

Reading is three steps, each a pure function of the bytes ``read`` hands
back (the module never does I/O itself and never looks at a clock):

1. *Find the copies.* The primary is read at 0. If it is sound, the
   secondary is read at the primary's ``hdr_size``; if not, the secondary
   is probed at every offset cryptsetup probes (0x4000 ... 0x400000) and
   the first sound one wins. A primary of version 1 is a LUKS1 image: it
   is refused outright, as cryptsetup does, not passed over for a
   secondary (any other wrong version only makes the primary bad).
2. *Judge each copy.* A copy is sound when its magic, version, size,
   location, checksum and JSON metadata are all valid (cryptsetup, too,
   validates each copy's JSON before choosing). Of two sound copies the one
   with the higher ``seqid`` wins; on a tie, the primary.
3. *Report the other copy* as CURRENT (sound, same seqid), STALE (sound,
   older), BAD (recognisable but invalid) or MISSING (no magic, or beyond
   the end of the image), so that a writer can repair it.

The JSON area is judged as cryptsetup judges it: it starts with ``{``, the
text runs to the first NUL (JSON whitespace may follow the closing brace)
and everything after that NUL, to the end of the area, is zero.

Validation follows lib/luks2/luks2_json_metadata.c: uint64 values are JSON
strings of decimal digits, ids are decimal strings, every area lies inside
the keyslots area and no two overlap, segments are numbered without gaps
and do not overlap (a segment may end past 2^64: the open, which knows the
image's size, refuses one longer than the image), every keyslot is bound to
exactly one digest and every segment to at least one.

qmpd is stricter than cryptsetup's loader on purpose, where cryptsetup
would only fail (or misbehave) later when the field is used, or never
writes such a header; tests/tools/luks2_validation_cases.py lists each
difference as a documented exception, checked against cryptsetup 2.6 by
tests/crypto/luks/test_luks2_validation_suite.py. In short: the JSON must
be strict RFC 8259 JSON (json-c also takes comments, single quotes,
trailing commas, NaN, duplicate keys and non-UTF-8 bytes); ids are
canonical and keyslot and token ids below 32, the ids cryptsetup's
commands address; numbers that would steer later work (KDF costs, key and
area sizes, the AF stripe count) are bounded here rather than trusted;
only ``luks2`` keyslots, ``pbkdf2`` digests and ``crypt`` segments are
understood; a segment at offset 0 is taken only for a detached header.
Reencryption metadata is refused; tokens are checked for shape and kept
raw.

Every failure is a :class:`CryptoError` whose text names the field and the
id, never a value of a salt, digest or other key material.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import json
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn

from qmpd.crypto.errors import CryptoError

MAGIC_PRIMARY = b"LUKS\xba\xbe"
MAGIC_SECONDARY = b"SKUL\xba\xbe"
VERSION = 2
BINARY_HEADER_SIZE = 4096
CSUM_OFFSET = 448
CSUM_SIZE = 64
# hdr_size: 16 KiB ... 4 MiB, powers of two (LUKS2_check_metadata_area_size).
HDR_SIZES = tuple(0x4000 << i for i in range(9))
assert HDR_SIZES[-1] == 0x400000
# Where cryptsetup looks for the secondary when the primary is unusable.
SECONDARY_PROBE_OFFSETS = HDR_SIZES
MAX_KEYSLOTS = 32
MAX_TOKENS = 32
KEYSLOTS_ALIGN = 4096
MAX_KEYSLOTS_SIZE = 128 * 1024 * 1024  # LUKS2_MAX_KEYSLOTS_SIZE
STRIPES = 4000
SECTOR_SIZE = 512
SECTOR_SIZES = (512, 1024, 2048, 4096)
# Bounds on what later code would have to compute; beyond them a header is
# refused, not trusted. pbkdf2 iterations and argon2 time are uint32 in
# cryptsetup; argon2 memory is capped at cryptsetup's maximum (4 GiB).
MAX_ITERATIONS = 0xFFFFFFFF
MAX_ARGON2_TIME = 0xFFFFFFFF
MIN_ARGON2_MEMORY = 8  # KiB, Argon2's minimum per lane
MAX_ARGON2_MEMORY = 4 * 1024 * 1024  # KiB
MAX_ARGON2_CPUS = (1 << 24) - 1  # Argon2's lane limit
MAX_KEY_SIZE = 512  # bytes
MAX_SALT_SIZE = 1024  # bytes, after base64 decoding
CHECKSUM_ALGS = ("sha1", "sha256", "sha384", "sha512")
UINT64_MAX = (1 << 64) - 1

# magic, version, hdr_size, seqid, label, checksum_alg, salt, uuid,
# subsystem, hdr_offset
_BINARY = struct.Struct(">6sHQQ48s32s64s40s48sQ")
assert _BINARY.size == 264

_DIGITS = re.compile(r"[0-9]+")


class Copy(enum.Enum):
    PRIMARY = "primary"
    SECONDARY = "secondary"


class CopyState(enum.Enum):
    CURRENT = "current"  # sound and as new as the copy in use
    STALE = "stale"  # sound but an older seqid
    BAD = "bad"  # recognisable (magic) but invalid
    MISSING = "missing"  # no magic where it should be, or past the end


@dataclass(frozen=True)
class Pbkdf2:
    hash: str
    iterations: int
    salt: bytes = field(repr=False)
    type: str = "pbkdf2"


@dataclass(frozen=True)
class Argon2:
    type: str  # "argon2i" or "argon2id"
    time: int
    memory: int  # KiB
    cpus: int
    salt: bytes = field(repr=False)


@dataclass(frozen=True)
class KeyslotArea:
    offset: int  # bytes from the start of the device
    size: int
    encryption: str
    key_size: int
    type: str = "raw"


@dataclass(frozen=True)
class Keyslot:
    key_size: int  # bytes of the volume key AF-split in the area
    area: KeyslotArea
    kdf: Pbkdf2 | Argon2
    af_stripes: int
    af_hash: str
    priority: int | None  # None: not set (cryptsetup's "normal")
    type: str = "luks2"


@dataclass(frozen=True)
class Digest:
    keyslots: tuple[int, ...]
    segments: tuple[int, ...]
    hash: str
    iterations: int
    salt: bytes = field(repr=False)
    digest: bytes = field(repr=False)
    type: str = "pbkdf2"


@dataclass(frozen=True)
class Segment:
    offset: int  # bytes
    size: int | None  # bytes; None for "dynamic" (to the end of the device)
    iv_tweak: int
    encryption: str
    sector_size: int
    flags: tuple[str, ...] = ()
    integrity: dict[str, Any] | None = None
    type: str = "crypt"


@dataclass(frozen=True)
class Config:
    json_size: int
    keyslots_size: int
    flags: tuple[str, ...] = ()
    requirements_mandatory: tuple[str, ...] = ()


@dataclass(frozen=True)
class Luks2Header:
    seqid: int
    hdr_size: int
    label: str
    subsystem: str
    uuid: str
    checksum_alg: str
    copy: Copy  # the copy these values come from
    other_copy: CopyState  # the state of the other one
    keyslots: dict[int, Keyslot]
    segments: dict[int, Segment]
    digests: dict[int, Digest]
    tokens: dict[int, dict[str, Any]]  # raw, as found
    config: Config
    metadata: dict[str, Any] = field(repr=False)  # the whole JSON, raw
    hdr_salt: bytes = field(repr=False, default=b"")

    @property
    def keyslots_offset(self) -> int:
        return 2 * self.hdr_size

    @property
    def keyslots_end(self) -> int:
        return 2 * self.hdr_size + self.config.keyslots_size

    @property
    def data_offset(self) -> int:
        return min(segment.offset for segment in self.segments.values())


def read_luks2(read: Callable[[int, int], bytes], *, detached_header: bool = False) -> Luks2Header:
    """Read, choose and validate the LUKS2 metadata of an image.

    ``read(offset, length)`` returns up to ``length`` bytes at ``offset``
    (fewer at the end of the image). ``detached_header`` allows a segment
    at offset 0, as cryptsetup does for a header kept apart from its data.
    """
    primary = _read_copy(read, 0, Copy.PRIMARY, detached_header)
    if isinstance(primary, _Luks1):
        raise CryptoError(str(primary))
    if isinstance(primary, Luks2Header):
        secondary = _read_copy(read, primary.hdr_size, Copy.SECONDARY, detached_header)
    else:
        secondary = _Missing("no LUKS2 secondary header found")
        for offset in SECONDARY_PROBE_OFFSETS:
            found = _read_copy(read, offset, Copy.SECONDARY, detached_header)
            if isinstance(found, Luks2Header):
                secondary = found
                break
            if isinstance(secondary, _Missing) and isinstance(found, CryptoError):
                secondary = found  # the first recognisable one, for the error
    if isinstance(primary, Luks2Header) and isinstance(secondary, Luks2Header):
        if secondary.seqid > primary.seqid:
            return _with_other(secondary, CopyState.STALE)
        state = CopyState.CURRENT if secondary.seqid == primary.seqid else CopyState.STALE
        return _with_other(primary, state)
    if isinstance(primary, Luks2Header):
        return _with_other(primary, _state_of(secondary))
    if isinstance(secondary, Luks2Header):
        return _with_other(secondary, _state_of(primary))
    # Neither copy is usable: explain the most telling failure.
    if isinstance(primary, CryptoError):
        raise primary
    if isinstance(secondary, CryptoError):
        raise secondary
    raise CryptoError(primary.reason)


class _Missing:
    """No copy at a place (no magic, or beyond the end of the image)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _state_of(result: "_Missing | CryptoError | Luks2Header") -> CopyState:
    return CopyState.MISSING if isinstance(result, _Missing) else CopyState.BAD


def _with_other(header: Luks2Header, state: CopyState) -> Luks2Header:
    return replace(header, other_copy=state)


def _read_copy(
    read: Callable[[int, int], bytes], offset: int, copy: Copy, detached: bool
) -> "Luks2Header | CryptoError | _Missing":
    try:
        return _parse_copy(read, offset, copy, detached)
    except _NotThere as missing:
        return _Missing(str(missing))
    except CryptoError as err:
        return err


class _NotThere(Exception):
    pass


class _Luks1(CryptoError):
    """A primary header of version 1: a LUKS1 image, whose secondary is not looked for."""


def _parse_copy(
    read: Callable[[int, int], bytes], offset: int, copy: Copy, detached: bool
) -> Luks2Header:
    where = f"LUKS2 {copy.value} header"
    binary = bytes(read(offset, BINARY_HEADER_SIZE)[:BINARY_HEADER_SIZE])
    magic = MAGIC_PRIMARY if copy is Copy.PRIMARY else MAGIC_SECONDARY
    if len(binary) < len(magic) or binary[: len(magic)] != magic:
        raise _NotThere(f"Volume is not in LUKS2 format (no {copy.value} header magic)")
    if len(binary) < BINARY_HEADER_SIZE:
        raise CryptoError(f"{where} is truncated")
    (_magic, version, hdr_size, seqid, label, checksum_alg, salt, uuid, subsystem, hdr_offset) = (
        _BINARY.unpack_from(binary, 0)
    )
    if version != VERSION:
        error = _Luks1 if copy is Copy.PRIMARY and version == 1 else CryptoError
        raise error(f"{where}: LUKS version {version} is not supported")
    if hdr_size not in HDR_SIZES:
        raise CryptoError(f"{where}: unsupported header size {hdr_size}")
    if hdr_offset != offset:
        raise CryptoError(
            f"{where}: header offset {hdr_offset} does not match its location {offset}"
        )
    if copy is Copy.SECONDARY and hdr_size != offset:
        raise CryptoError(f"{where}: header size {hdr_size} does not match its location {offset}")
    alg = _c_string(checksum_alg)
    if alg not in CHECKSUM_ALGS:
        raise CryptoError(f"{where}: unsupported checksum algorithm {_show(alg)}")
    json_area = bytes(read(offset + BINARY_HEADER_SIZE, hdr_size - BINARY_HEADER_SIZE))
    if len(json_area) != hdr_size - BINARY_HEADER_SIZE:
        raise CryptoError(f"{where} is truncated")
    hasher = hashlib.new(alg)
    hasher.update(binary[:CSUM_OFFSET])
    hasher.update(bytes(CSUM_SIZE))
    hasher.update(binary[CSUM_OFFSET + CSUM_SIZE :])
    hasher.update(json_area)
    stored = binary[CSUM_OFFSET : CSUM_OFFSET + hasher.digest_size]
    if hasher.digest() != stored:
        raise CryptoError(f"{where} checksum does not match")
    metadata = _load_json(json_area, where)
    parsed = _validate(metadata, hdr_size, detached, where)
    return Luks2Header(
        seqid=seqid,
        hdr_size=hdr_size,
        label=_c_string(label),
        subsystem=_c_string(subsystem),
        uuid=_c_string(uuid),
        checksum_alg=alg,
        copy=copy,
        other_copy=CopyState.MISSING,
        metadata=metadata,
        hdr_salt=salt,
        **parsed,
    )


def _c_string(raw: bytes) -> str:
    """A fixed field's C string; cryptsetup does not restrict its bytes."""
    return raw.split(b"\0", 1)[0].decode("utf-8", errors="replace")


def _show(value: object) -> str:
    """A short, printable rendering of a value from the header, for errors: a
    string quoted, anything else as JSON (null, 42, {...}), never a Python repr;
    '<' escaped, so no text from an image can pass for a repr ("<object ...>")."""
    if not isinstance(value, str):
        text = json.dumps(value, default=str).replace("<", "\\u003c")
        return text[:32] + ("..." if len(text) > 32 else "")
    text = value.encode("ascii", "backslashreplace").decode("ascii").replace("<", "\\x3c")
    return repr(text[:32] + ("..." if len(text) > 32 else ""))


# -- JSON ----------------------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise CryptoError(f"LUKS2 metadata has a duplicate key {_show(key)}")
        result[key] = value
    return result


def _no_constant(name: str) -> NoReturn:
    raise CryptoError(f"LUKS2 metadata has a non-JSON number {name}")


#: json-c's default depth (JSON_TOKENER_DEFAULT_DEPTH 32), which cryptsetup
#: parses the area with: at most 31 objects and arrays inside each other
#: (measured: a token 28 arrays deep loads, 29 deep is "not a valid LUKS
#: device"). Checked on the text itself, not left to the interpreter's
#: recursion limit (Python 3.13's json parses far deeper).
MAX_JSON_NESTING = 31
_NESTING_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _nesting(text: str) -> int:
    """The deepest nesting of objects and arrays in ``text`` (strings skipped)."""
    depth = deepest = 0
    for match in _NESTING_TOKENS.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif token in "]}":
            depth -= 1
    return deepest


def _load_json(area: bytes, where: str) -> dict[str, Any]:
    """The JSON area's object: ``{`` first, the text up to the first NUL, and
    nothing but NULs from there to the end of the area (as cryptsetup)."""
    end = area.find(b"\0")
    if end < 0:
        raise CryptoError(f"{where}: JSON area is not NUL terminated")
    if area[:1] != b"{":
        raise CryptoError(f"{where}: JSON area does not start with '{{'")
    if area.count(0, end) != len(area) - end:
        raise CryptoError(f"{where}: JSON area has data after the terminating NUL")
    try:
        text = area[:end].decode("utf-8")
        if _nesting(text) > MAX_JSON_NESTING:
            raise ValueError("nested too deeply")
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except CryptoError as err:
        raise CryptoError(f"{where}: {err}") from None
    except (ValueError, RecursionError):
        raise CryptoError(f"{where}: JSON area does not hold valid JSON") from None
    if not isinstance(value, dict):
        raise CryptoError(f"{where}: JSON metadata is not an object")
    return value


class _Fields:
    """Typed access to one JSON object, with errors naming where it is."""

    def __init__(self, obj: object, what: str) -> None:
        if not isinstance(obj, dict):
            raise CryptoError(f"{what} is not an object")
        self.obj = obj
        self.what = what

    def fail(self, text: str) -> NoReturn:
        raise CryptoError(f"{self.what} {text}")

    def get(self, name: str, default: object = None) -> Any:
        return self.obj.get(name, default)

    def has(self, name: str) -> bool:
        return name in self.obj

    def require(self, name: str) -> Any:
        if name not in self.obj:
            self.fail(f"has no {name!r}")
        return self.obj[name]

    def obj_(self, name: str) -> "_Fields":
        value = self.require(name)
        if not isinstance(value, dict):
            self.fail(f"{name!r} is not an object")
        return _Fields(value, f"{self.what} {name}")

    def string(self, name: str) -> str:
        value = self.require(name)
        if not isinstance(value, str) or not value:
            self.fail(f"{name!r} is not a non-empty string")
        return value

    def const(self, name: str, *allowed: str) -> str:
        value = self.require(name)
        if value not in allowed:
            self.fail(f"{name} {_show(value)} is not supported")
        return value

    def uint64(self, name: str) -> int:
        """A uint64 stored, as LUKS2 does, as a string of decimal digits."""
        value = self.require(name)
        if not isinstance(value, str) or not _DIGITS.fullmatch(value):
            self.fail(f"{name!r} is not a string of decimal digits")
        if len(value) > 20 or int(value) > UINT64_MAX:
            self.fail(f"{name!r} does not fit in 64 bits")
        return int(value)

    def integer(self, name: str, low: int, high: int) -> int:
        value = self.require(name)
        if type(value) is not int:
            self.fail(f"{name!r} is not an integer")
        if not low <= value <= high:
            self.fail(f"{name} {value} is out of range [{low}, {high}]")
        return value

    def base64(self, name: str) -> bytes:
        value = self.require(name)
        if not isinstance(value, str):
            self.fail(f"{name!r} is not a base64 string")
        try:
            raw = base64.b64decode(value.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError, ValueError):
            self.fail(f"{name!r} is not valid base64")
        if not raw or len(raw) > MAX_SALT_SIZE:
            self.fail(f"{name!r} has an unsupported length")
        return raw

    def strings(self, name: str) -> tuple[str, ...]:
        value = self.require(name)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.fail(f"{name!r} is not an array of strings")
        return tuple(value)


def _ids(section: _Fields, limit: int | None) -> dict[int, Any]:
    """A section's members keyed by their ids (decimal strings)."""
    result: dict[int, Any] = {}
    for key, value in section.obj.items():
        if not _DIGITS.fullmatch(key) or len(key) > 10:
            section.fail(f"id {_show(key)} is not a decimal number")
        index = int(key)
        if key != str(index):
            section.fail(f"id {_show(key)} is not in canonical form")
        if limit is not None and index >= limit:
            section.fail(f"id {index} is out of range [0, {limit - 1}]")
        result[index] = value
    return dict(sorted(result.items()))


def _id_list(owner: _Fields, name: str, known: dict[int, Any], kind: str) -> tuple[int, ...]:
    refs = []
    for ref in owner.strings(name):
        if (
            not _DIGITS.fullmatch(ref)
            or len(ref) > 10
            or int(ref) not in known
            or ref != str(int(ref))
        ):
            owner.fail(f"references a missing {kind} {_show(ref)}")
        refs.append(int(ref))
    if len(set(refs)) != len(refs):
        owner.fail(f"lists a {kind} twice")
    return tuple(refs)


def _validate(
    metadata: dict[str, Any], hdr_size: int, detached: bool, where: str
) -> dict[str, Any]:
    top = _Fields(metadata, "LUKS2 metadata")
    for name in ("keyslots", "tokens", "segments", "digests", "config"):
        top.obj_(name)

    config = _config(top.obj_("config"), hdr_size)
    raw_keyslots = _ids(_Fields(metadata["keyslots"], "LUKS2 keyslots"), MAX_KEYSLOTS)
    raw_segments = _ids(_Fields(metadata["segments"], "LUKS2 segments"), None)
    if not raw_segments:
        raise CryptoError("LUKS2 segments section is empty")
    raw_digests = _ids(_Fields(metadata["digests"], "LUKS2 digests"), None)
    raw_tokens = _ids(_Fields(metadata["tokens"], "LUKS2 tokens"), MAX_TOKENS)

    keyslots = {i: _keyslot(i, value) for i, value in raw_keyslots.items()}
    segments = {i: _segment(i, value) for i, value in raw_segments.items()}
    digests = {i: _digest(i, value, keyslots, segments) for i, value in raw_digests.items()}
    for i, value in raw_tokens.items():
        token = _Fields(value, f"LUKS2 token {i}")
        token.string("type")
        _id_list(token, "keyslots", keyslots, "keyslot")

    for i in keyslots:
        bound = sum(i in d.keyslots for d in digests.values())
        if not bound:
            raise CryptoError(f"LUKS2 keyslot {i} is not assigned to any digest")
        if bound > 1:
            raise CryptoError(f"LUKS2 keyslot {i} is assigned to more than one digest")
    for i in segments:
        if not any(i in d.segments for d in digests.values()):
            raise CryptoError(f"LUKS2 segment {i} is not assigned to any digest")

    _check_areas(keyslots, hdr_size, config.keyslots_size)
    _check_segments(segments, hdr_size, config.keyslots_size, detached)
    return dict(
        keyslots=keyslots, segments=segments, digests=digests, tokens=raw_tokens, config=config
    )


def _config(section: _Fields, hdr_size: int) -> Config:
    section.what = "LUKS2 config"
    json_size = section.uint64("json_size")
    keyslots_size = section.uint64("keyslots_size")
    if json_size != hdr_size - BINARY_HEADER_SIZE:
        section.fail(f"json_size {json_size} does not match the header size {hdr_size}")
    if keyslots_size % KEYSLOTS_ALIGN:
        section.fail(f"keyslots_size {keyslots_size} is not a multiple of {KEYSLOTS_ALIGN}")
    if keyslots_size > MAX_KEYSLOTS_SIZE:
        section.fail(f"keyslots_size {keyslots_size} is larger than {MAX_KEYSLOTS_SIZE}")
    flags = section.strings("flags") if section.has("flags") else ()
    mandatory: tuple[str, ...] = ()
    if section.has("requirements"):
        requirements = section.obj_("requirements")
        if requirements.has("mandatory"):
            mandatory = requirements.strings("mandatory")
    return Config(json_size, keyslots_size, flags, mandatory)


def _keyslot(index: int, value: object) -> Keyslot:
    slot = _Fields(value, f"LUKS2 keyslot {index}")
    slot.const("type", "luks2")
    key_size = slot.integer("key_size", 1, MAX_KEY_SIZE)
    priority = slot.integer("priority", 0, 2) if slot.has("priority") else None

    area = slot.obj_("area")
    area.const("type", "raw")
    area_value = KeyslotArea(
        offset=area.uint64("offset"),
        size=area.uint64("size"),
        encryption=area.string("encryption"),
        key_size=area.integer("key_size", 1, MAX_KEY_SIZE),
    )

    kdf = slot.obj_("kdf")
    kdf_type = kdf.const("type", "pbkdf2", "argon2i", "argon2id")
    kdf_value: Pbkdf2 | Argon2
    if kdf_type == "pbkdf2":
        kdf_value = Pbkdf2(
            hash=kdf.string("hash"),
            iterations=kdf.integer("iterations", 1, MAX_ITERATIONS),
            salt=kdf.base64("salt"),
        )
    else:
        cpus = kdf.integer("cpus", 1, MAX_ARGON2_CPUS)
        memory = kdf.integer("memory", MIN_ARGON2_MEMORY, MAX_ARGON2_MEMORY)
        if memory < MIN_ARGON2_MEMORY * cpus:
            kdf.fail(f"memory {memory} is too small for {cpus} cpus")
        kdf_value = Argon2(
            type=kdf_type,
            time=kdf.integer("time", 1, MAX_ARGON2_TIME),
            memory=memory,
            cpus=cpus,
            salt=kdf.base64("salt"),
        )

    af = slot.obj_("af")
    af.const("type", "luks1")
    stripes = af.require("stripes")
    if type(stripes) is not int or stripes != STRIPES:
        af.fail(f"stripes must be {STRIPES}")
    af_hash = af.string("hash")

    needed = -(-key_size * STRIPES // SECTOR_SIZE) * SECTOR_SIZE
    if area_value.size < needed:
        slot.fail(
            f"area size {area_value.size} is too small for a {key_size}-byte key "
            f"({needed} bytes needed)"
        )
    return Keyslot(
        key_size=key_size,
        area=area_value,
        kdf=kdf_value,
        af_stripes=stripes,
        af_hash=af_hash,
        priority=priority,
    )


def _segment(index: int, value: object) -> Segment:
    seg = _Fields(value, f"LUKS2 segment {index}")
    seg.const("type", "crypt")
    offset = seg.uint64("offset")
    size: int | None
    if seg.get("size") == "dynamic":
        size = None
    else:
        size = seg.uint64("size")
        if size == 0:
            seg.fail("size is zero")
    iv_tweak = seg.uint64("iv_tweak")
    encryption = seg.string("encryption")
    sector_size = seg.require("sector_size")
    if type(sector_size) is not int or sector_size not in SECTOR_SIZES:
        seg.fail("sector_size must be 512, 1024, 2048 or 4096")
    if offset % SECTOR_SIZE:
        seg.fail(f"offset {offset} is not a multiple of {SECTOR_SIZE}")
    if size is not None and size % sector_size:
        seg.fail(f"size {size} is not a multiple of the sector size {sector_size}")
    flags = seg.strings("flags") if seg.has("flags") else ()
    integrity = None
    if seg.has("integrity"):
        integ = seg.obj_("integrity")
        for name in ("type", "journal_encryption", "journal_integrity"):
            integ.string(name)
        integrity = integ.obj
    return Segment(
        offset=offset,
        size=size,
        iv_tweak=iv_tweak,
        encryption=encryption,
        sector_size=sector_size,
        flags=flags,
        integrity=integrity,
    )


def _digest(
    index: int, value: object, keyslots: dict[int, Keyslot], segments: dict[int, Segment]
) -> Digest:
    dig = _Fields(value, f"LUKS2 digest {index}")
    dig.const("type", "pbkdf2")
    return Digest(
        keyslots=_id_list(dig, "keyslots", keyslots, "keyslot"),
        segments=_id_list(dig, "segments", segments, "segment"),
        hash=dig.string("hash"),
        iterations=dig.integer("iterations", 1, MAX_ITERATIONS),
        salt=dig.base64("salt"),
        digest=dig.base64("digest"),
    )


def _check_areas(keyslots: dict[int, Keyslot], hdr_size: int, keyslots_size: int) -> None:
    start, end = 2 * hdr_size, 2 * hdr_size + keyslots_size
    for i, slot in keyslots.items():
        area = slot.area
        if area.offset < start or area.offset + area.size > end:
            raise CryptoError(
                f"LUKS2 keyslot {i} area is outside the keyslots area [{start}, {end})"
            )
    items = list(keyslots.items())
    for n, (j, later) in enumerate(items):
        for i, earlier in items[:n]:
            a, b = earlier.area, later.area
            if a.offset < b.offset + b.size and b.offset < a.offset + a.size:
                raise CryptoError(f"LUKS2 keyslot {j} area overlaps keyslot {i}")


def _check_segments(
    segments: dict[int, Segment], hdr_size: int, keyslots_size: int, detached: bool
) -> None:
    for expected, index in enumerate(segments):
        if index != expected:
            raise CryptoError(f"LUKS2 segments have a gap at id {expected}")
    last = len(segments) - 1
    keyslots_end = 2 * hdr_size + keyslots_size
    for i, seg in segments.items():
        if seg.size is None and i != last:
            raise CryptoError(f"LUKS2 segment {i} is 'dynamic' but not the last segment")
        if seg.offset < keyslots_end and not (detached and seg.offset == 0):
            raise CryptoError(
                f"LUKS2 segment {i} offset {seg.offset} overlaps the "
                f"metadata and keyslots area (which ends at {keyslots_end})"
            )
    items = list(segments.items())
    for n, (j, later) in enumerate(items):
        for i, earlier in items[:n]:
            if _overlap(earlier, later):
                raise CryptoError(f"LUKS2 segment {j} overlaps segment {i}")


def _overlap(a: Segment, b: Segment) -> bool:
    a_end = a.offset + a.size if a.size is not None else UINT64_MAX + 1
    b_end = b.offset + b.size if b.size is not None else UINT64_MAX + 1
    return a.offset < b_end and b.offset < a_end
