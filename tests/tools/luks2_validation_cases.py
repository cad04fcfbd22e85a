"""cryptsetup's LUKS2 header-validation cases, rebuilt by our own script.

Theory of operation
-------------------
cryptsetup tests its LUKS2 metadata checks (tests/luks2-validation-test)
with images that shell generators derive from one valid image: each takes
the valid header, changes one thing in the JSON (with jq) or in the binary
header, recomputes the SHA-256 checksum so that only the change is under
test, and usually spoils the other copy's magic so that cryptsetup cannot
fall back to it. The test then runs ``cryptsetup luksDump`` on the image and
expects success ("R") or failure ("F"). (Our test runs ``luksDump --type
luks2``: qmpd's reader is the LUKS2 loader, and without ``--type`` cryptsetup
first guesses the LUKS version from the primary alone, refusing e.g. a
primary of version 3 before it looks at a sound secondary. On the suite's
cases both give the same verdicts.)

This module does the same with its own code. :func:`make_base` formats one
small valid image with the real cryptsetup (8 keyslots, slots 1 and 2
Argon2id, the others PBKDF2, all at the smallest costs; keyslots area
4 MiB; data at 16 MiB, 512-byte sectors, as the images of cryptsetup's
suite). :func:`build` reads that image's two header copies,
and for every :class:`Case` in :data:`CASES` writes a new image: every
case's JSON edit is a jq filter run by the ``jq`` program; the byte layout
(JSON padded with NULs to the area size, binary-header fields, the
checksum over the binary header with its checksum field zeroed plus the
JSON area) is computed here and written into a sparse file of the base's
size with ``xxd -r -p -s OFFSET``, over the base's two copies. The keyslot areas are not copied: both
verdicts under test are about loading the metadata.

``manifest.json`` next to the images lists, per case: its name, what it
changes, the verdict cryptsetup 2.6 gives (``expected``: "valid" or
"invalid", cryptsetup's own R/F for the cases taken from its suite), where
the case comes from (``cryptsetup`` for a case of its suite under the same
name, ``qmpd`` for one added here), and, for a deliberate difference, the
verdict qmpd gives instead (``qmpd``) with the reason (``reason``).

Copies named below: ``primary`` is the copy at 0, ``secondary`` the one at
``hdr_size``; "killed" means its magic was overwritten with ``VACUUM`` (no
longer recognisable as a header), "sealed" that its checksum was recomputed.

Run by hand: ``.venv/bin/python -m tests.tools.luks2_validation_cases DIR``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HDR = 0x4000                    # the base image's metadata size
BIN = 4096                      # binary header size
CSUM_OFFSET, CSUM_SIZE = 448, 64
HDR_SIZE_OFFSET, HDR_OFFSET_OFFSET, CSUM_ALG_OFFSET = 8, 256, 72
DATA_OFFSET = 16 * 1024 * 1024
IMAGE_SIZE = 17 * 1024 * 1024
UINT64_MAX = (1 << 64) - 1
KILL = b"VACUUM"
ARGON2_SLOTS = (1, 2)
KEYSLOTS = 8
METADATA_SIZES = {"16k": 0x4000, "32k": 0x8000, "64k": 0x10000, "128k": 0x20000,
                  "256k": 0x40000, "512k": 0x80000, "1m": 0x100000, "2m": 0x200000,
                  "4m": 0x400000}

PBKDF2 = ("--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000")
ARGON2 = ("--pbkdf", "argon2id", "--pbkdf-memory", "32", "--pbkdf-force-iterations", "4",
          "--pbkdf-parallel", "1")


def passphrase(slot: int) -> bytes:
    return f"validation passphrase {slot}".encode()


def _run(args: list[str], *, input: bytes | None = None) -> bytes:
    proc = subprocess.run(args, input=input, capture_output=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"{args[0]} exited {proc.returncode}: "
                           f"{proc.stderr.decode(errors='replace')}")
    return proc.stdout


def make_base(directory: Path) -> Path:
    """The valid image every case starts from, made by cryptsetup."""
    path = directory / "luks2-valid.img"
    keys = []
    for slot in range(KEYSLOTS):
        key = directory / f"key{slot}"
        key.write_bytes(passphrase(slot))
        keys.append(key)
    with open(path, "wb") as f:
        f.truncate(IMAGE_SIZE)
    _run(["cryptsetup", "luksFormat", "--type", "luks2", "--batch-mode", *PBKDF2,
          "--cipher", "aes-xts-plain64", "--key-size", "512", "--sector-size", "512",
          "--offset", str(DATA_OFFSET // 512), "--luks2-keyslots-size", "4m",
          "--key-file", str(keys[0]), str(path)])
    for slot in range(1, KEYSLOTS):
        costs = ARGON2 if slot in ARGON2_SLOTS else PBKDF2
        _run(["cryptsetup", "luksAddKey", "--batch-mode", *costs, "--key-slot", str(slot),
              "--key-file", str(keys[0]), str(path), str(keys[slot])])
    return path


# -- the base header and byte helpers -------------------------------------------

@dataclass(frozen=True)
class Base:
    hdr0: bytes             # the primary's binary header
    hdr1: bytes             # the secondary's binary header
    area1: bytes            # the secondary's JSON area, as found
    json: str               # the primary's JSON text, compact as cryptsetup writes it
    size: int               # bytes of the image


def read_base(path: Path) -> Base:
    data = path.read_bytes()[:2 * HDR]
    text = data[BIN:HDR].split(b"\0", 1)[0].decode()
    return Base(hdr0=data[:BIN], hdr1=data[HDR:HDR + BIN], area1=data[HDR + BIN:2 * HDR],
                json=text, size=path.stat().st_size)


def jq(text: str, program: str, **args: str) -> str:
    """``text`` edited by the jq ``program``; ``args`` become jq's ``$name`` strings."""
    argv = ["jq", "-c", "-M"]
    for name, value in args.items():
        argv += ["--arg", name, value]
    return _run(argv + [program], input=text.encode()).decode().rstrip("\n")


def area(text: str | bytes, size: int) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    if len(raw) > size:
        raise ValueError(f"JSON of {len(raw)} bytes does not fit in a {size}-byte area")
    return raw + bytes(size - len(raw))


def field(binary: bytes, offset: int, value: int | bytes) -> bytes:
    raw = struct.pack(">Q", value) if isinstance(value, int) else value
    return binary[:offset] + raw + binary[offset + len(raw):]


def sealed(binary: bytes, json_area: bytes) -> bytes:
    """The copy with its checksum recomputed over binary header and JSON area."""
    alg = binary[CSUM_ALG_OFFSET:CSUM_ALG_OFFSET + 32].split(b"\0", 1)[0].decode()
    blank = field(binary, CSUM_OFFSET, bytes(CSUM_SIZE))
    digest = hashlib.new(alg, blank + json_area).digest()
    return field(blank, CSUM_OFFSET, digest) + json_area


def killed(copy: bytes) -> bytes:
    return KILL + copy[len(KILL):]


Regions = dict[int, bytes]      # offset in the image -> bytes written there


def original_secondary(base: Base) -> bytes:
    return base.hdr1 + base.area1


def primary_only(base: Base, json_area: bytes | str) -> Regions:
    """The primary carries the change (sealed); the secondary is killed."""
    raw = json_area if isinstance(json_area, bytes) else area(json_area, HDR - BIN)
    return {0: sealed(base.hdr0, raw), HDR: killed(original_secondary(base))}


def both(base: Base, text: str) -> Regions:
    """Both copies carry the same changed JSON, each sealed."""
    raw = area(text, HDR - BIN)
    return {0: sealed(base.hdr0, raw), HDR: sealed(base.hdr1, raw)}


def resized(base: Base, size: int, text: str) -> tuple[bytes, bytes]:
    """Primary and secondary copies of ``size`` bytes holding ``text``, sealed."""
    raw = area(text, size - BIN)
    hdr0 = field(base.hdr0, HDR_SIZE_OFFSET, size)
    hdr1 = field(field(base.hdr1, HDR_SIZE_OFFSET, size), HDR_OFFSET_OFFSET, size)
    return sealed(hdr0, raw), sealed(hdr1, raw)


def moved_json(base: Base, size: int, *, area_shift: int | None = None) -> str:
    """The JSON for metadata of ``size`` bytes: keyslot areas shifted, json_size set."""
    shift = 2 * (size - HDR) if area_shift is None else area_shift
    return jq(base.json, '.keyslots[].area.offset |= (tonumber + ($shift | tonumber) | tostring)'
              ' | .config.json_size = $jsize | .segments."0".offset = $data',
              shift=str(shift), jsize=str(size - BIN), data=str(DATA_OFFSET))


def write_image(path: Path, base: Base, regions: Regions) -> None:
    """A sparse image of the base's size: the base's two copies with ``regions``
    laid over them, written by xxd (runs of non-zero 4 KiB blocks only)."""
    layout = bytearray(base.hdr0 + area(base.json, HDR - BIN) + base.hdr1 + base.area1)
    for offset, raw in regions.items():
        if offset + len(raw) > len(layout):
            layout.extend(bytes(offset + len(raw) - len(layout)))
        layout[offset:offset + len(raw)] = raw
    with open(path, "wb") as f:
        f.truncate(base.size)
    block, start = 4096, None
    for at in range(0, len(layout) + block, block):
        chunk = layout[at:at + block]
        if any(chunk) and start is None:
            start = at
        elif not any(chunk) and start is not None:
            subprocess.run(["xxd", "-r", "-p", "-s", str(start), "-", str(path)],
                           input=layout[start:at].hex().encode(), check=True, timeout=60)
            start = None


# -- the cases ------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    name: str
    mutates: str
    expected: str                   # cryptsetup 2.6's verdict: "valid" or "invalid"
    build: Callable[[Base], Regions]
    origin: str = "cryptsetup"      # "cryptsetup": a case of its suite; "qmpd": ours
    qmpd: str | None = None         # qmpd's verdict where it differs on purpose
    reason: str | None = None

    def manifest(self) -> dict:
        entry = {"name": self.name, "mutates": self.mutates, "expected": self.expected,
                 "origin": self.origin}
        if self.qmpd is not None:
            entry.update(qmpd=self.qmpd, reason=self.reason)
        return entry


VALID, INVALID = "valid", "invalid"
CASES: list[Case] = []


def case(name: str, mutates: str, expected: str, **kw) -> Callable:
    def register(build: Callable[[Base], Regions]) -> Callable[[Base], Regions]:
        CASES.append(Case(name, mutates, expected, build, **kw))
        return build
    return register


def json_case(name: str, mutates: str, expected: str, program: str, *,
              copies: str = "primary", **kw) -> None:
    """A case that is one jq edit of the JSON, in the primary (secondary killed)
    or in both copies."""
    args = kw.pop("args", {})

    def build(base: Base) -> Regions:
        text = jq(base.json, program, **args)
        return primary_only(base, text) if copies == "primary" else both(base, text)
    CASES.append(Case(name, mutates, expected, build, **kw))


def _bad_checksum(copy: bytes, seed: bytes) -> bytes:
    return field(copy, CSUM_OFFSET, hashlib.sha256(seed).digest())


# [1] checksums and the fall-back to the other copy

@case("luks2-invalid-checksum-hdr0", "primary checksum overwritten", VALID)
def _(base: Base) -> Regions:
    return {0: _bad_checksum(base.hdr0, b"primary")}


@case("luks2-invalid-checksum-hdr1", "secondary checksum overwritten", VALID)
def _(base: Base) -> Regions:
    return {HDR: _bad_checksum(base.hdr1, b"secondary")}


@case("luks2-invalid-checksum-both-hdrs", "both checksums overwritten", INVALID)
def _(base: Base) -> Regions:
    return {0: _bad_checksum(base.hdr0, b"primary"), HDR: _bad_checksum(base.hdr1, b"secondary")}


# [2] a malformed copy with a correct checksum; JSON that fills the area

def _malformed(text: str, size: int) -> bytes:
    """The JSON with its closing brace replaced by an unterminated key that runs
    to the end of the area (no NUL anywhere)."""
    head = text[:-1] + ',"'
    filler = "no_closing_quote_and_no_terminating_nul_"
    raw = (head + filler * (size // len(filler) + 1)).encode()
    return raw[:size]


@case("luks2-corrupted-hdr0-with-correct-chks",
      "primary JSON area filled with unterminated JSON, checksum correct", VALID)
def _(base: Base) -> Regions:
    return {0: sealed(base.hdr0, _malformed(base.json, HDR - BIN))}


@case("luks2-corrupted-hdr1-with-correct-chks",
      "secondary JSON area filled with unterminated JSON, checksum correct", VALID)
def _(base: Base) -> Regions:
    return {HDR: sealed(base.hdr1, _malformed(base.json, HDR - BIN))}


def _config_filler(text: str, length: int) -> str:
    """The JSON with a string member added to config so that it is ``length`` long."""
    marker = '"config":{'
    at = text.index(marker) + len(marker)
    rest = text[at:]
    key = '"config_key":"'
    sep = "" if rest.startswith("}") else ","
    fill = length - len(text) - len(key) - 1 - len(sep)
    return text[:at] + key + "X" * fill + '"' + sep + rest


@case("luks2-correct-full-json0",
      "primary JSON grown (a config string) to the area size minus the NUL", VALID)
def _(base: Base) -> Regions:
    return primary_only(base, _config_filler(base.json, HDR - BIN - 1))


json_case("luks2-argon2-leftover-params",
          "Argon2 keyslot 1 turned into pbkdf2 (iterations, hash added), Argon2 fields left",
          VALID, '.keyslots."1".kdf.type = "pbkdf2" | .keyslots."1".kdf.iterations = 1001'
          ' | .keyslots."1".kdf.hash = "sha256"')
json_case("luks2-pbkdf2-leftover-params-0",
          "Argon2 keyslot 2 given type argon2i plus pbkdf2 fields (iterations, hash)",
          VALID, '.keyslots."2".kdf.type = "argon2i" | .keyslots."2".kdf.iterations = 1001'
          ' | .keyslots."2".kdf.hash = "sha256"')
json_case("luks2-pbkdf2-leftover-params-1",
          "Argon2 keyslot 2 given type argon2id plus pbkdf2 fields (iterations, hash)",
          VALID, '.keyslots."2".kdf.type = "argon2id" | .keyslots."2".kdf.iterations = 1001'
          ' | .keyslots."2".kdf.hash = "sha256"')


# [3] the JSON area's own rules, references between sections

@case("luks2-non-null-byte-beyond-json0", "an 'X' right after the JSON's closing brace", INVALID)
def _(base: Base) -> Regions:
    return primary_only(base, base.json + "X")


@case("luks2-non-null-bytes-beyond-json0",
      "text written into the JSON area 20 bytes after the terminating NUL", INVALID)
def _(base: Base) -> Regions:
    raw = bytearray(area(base.json, HDR - BIN))
    quote = b"bytes after the JSON text must all be zero"
    at = len(base.json) + 20
    raw[at:at + len(quote)] = quote
    return primary_only(base, bytes(raw))


@case("luks2-missing-trailing-null-byte-json0",
      "well-formed JSON exactly as long as the area: no terminating NUL", INVALID)
def _(base: Base) -> Regions:
    return primary_only(base, _config_filler(base.json, HDR - BIN).encode())


@case("luks2-invalid-opening-char-json0", "a space before the JSON's opening brace", INVALID)
def _(base: Base) -> Regions:
    return primary_only(base, " " + base.json)


@case("luks2-invalid-object-type-json0", "the JSON object wrapped in an array", INVALID)
def _(base: Base) -> Regions:
    return primary_only(base, "[" + base.json + "]")


json_case("luks2-overlapping-areas-c0-json0", "keyslot 7's area = keyslot 6's area", INVALID,
          '.keyslots."7".area.offset = .keyslots."6".area.offset'
          ' | .keyslots."7".area.size = .keyslots."6".area.size')
json_case("luks2-overlapping-areas-c1-json0", "keyslot 7's area inside keyslot 6's", INVALID,
          '.keyslots."7".area.offset = (.keyslots."6".area.offset | tonumber + 1 | tostring)'
          ' | .keyslots."7".area.size = (.keyslots."6".area.size | tonumber - 1 | tostring)')
json_case("luks2-overlapping-areas-c2-json0",
          "keyslot 7's area starts on keyslot 6's last byte", INVALID,
          '.keyslots."7".area.offset = ([.keyslots."6".area.offset, .keyslots."6".area.size]'
          ' | map(tonumber) | add - 1 | tostring)')
json_case("luks2-area-in-json-hdr-space-json0",
          "keyslot 0's area = the last byte of the secondary's JSON area", INVALID,
          '.keyslots."0".area.offset = $off | .keyslots."0".area.size = "1"',
          args={"off": str(2 * HDR - 1)})
json_case("luks2-missing-keyslot-referenced-in-digest",
          "digest 0 lists keyslot 8, which does not exist", INVALID,
          '.digests."0".keyslots += [(.keyslots | keys | map(tonumber) | max + 1 | tostring)]')
json_case("luks2-missing-segment-referenced-in-digest",
          "digest 0 lists segment 1, which does not exist", INVALID,
          '.digests."0".segments += [(.segments | keys | map(tonumber) | max + 1 | tostring)]')
json_case("luks2-missing-keyslot-referenced-in-token",
          "a token listing keyslots 0 and 8 (8 does not exist)", INVALID,
          '.tokens."0" = {"type": "dummy", "keyslots": ["0", '
          '(.keyslots | keys | map(tonumber) | max + 1 | tostring)]}')
json_case("luks2-keyslot-missing-digest", "keyslot 0 removed from digest 0's list", INVALID,
          'del(.digests."0".keyslots[0])')
json_case("luks2-keyslot-too-many-digests",
          "digest 1 = a copy of digest 0 listing keyslot 1 only", INVALID,
          '.digests."1" = .digests."0" | .digests."1".keyslots = ["1"]')

# [4] uint64 strings
json_case("luks2-uint64-max-segment-size", "segment 0 size = 2^64 - 512", VALID,
          '.segments."0".size = $v', args={"v": str(UINT64_MAX - 511)})
json_case("luks2-uint64-overflow-segment-size", "segment 0 size = 2^64", INVALID,
          '.segments."0".size = $v', args={"v": str(UINT64_MAX + 1)})
json_case("luks2-uint64-signed-segment-size", 'segment 0 size = "-512"', INVALID,
          '.segments."0".size = "-512"')

# [5] segments
_SEGMENT = [
    ("luks2-segment-missing-type", "segment 0 without type", 'del(.segments."0".type)'),
    ("luks2-segment-wrong-type", "segment 0 type = 42", '.segments."0".type = 42'),
    ("luks2-segment-missing-offset", "segment 0 without offset", 'del(.segments."0".offset)'),
    ("luks2-segment-wrong-offset", 'segment 0 offset = "-42"', '.segments."0".offset = "-42"'),
    ("luks2-segment-missing-size", "segment 0 without size", 'del(.segments."0".size)'),
    ("luks2-segment-wrong-size-0", "segment 0 size = 4096 (a number)",
     '.segments."0".size = 4096'),
    ("luks2-segment-wrong-size-1", 'segment 0 size = "automatic"',
     '.segments."0".size = "automatic"'),
    ("luks2-segment-wrong-size-2", 'segment 0 size = "511" (not a multiple of 512)',
     '.segments."0".size = "511"'),
    ("luks2-segment-crypt-missing-encryption", "segment 0 without encryption",
     'del(.segments."0".encryption)'),
    ("luks2-segment-crypt-wrong-encryption", "segment 0 encryption = {}",
     '.segments."0".encryption = {}'),
    ("luks2-segment-crypt-missing-ivoffset", "segment 0 without iv_tweak",
     'del(.segments."0".iv_tweak)'),
    ("luks2-segment-crypt-wrong-ivoffset", 'segment 0 iv_tweak = "dynamic"',
     '.segments."0".iv_tweak = "dynamic"'),
    ("luks2-segment-crypt-missing-sectorsize", "segment 0 without sector_size",
     'del(.segments."0".sector_size)'),
    ("luks2-segment-crypt-wrong-sectorsize-0", "segment 0 sector_size = 1023",
     '.segments."0".sector_size = 1023'),
    ("luks2-segment-crypt-wrong-sectorsize-1", 'segment 0 sector_size = "4096" (a string)',
     '.segments."0".sector_size = "4096"'),
    ("luks2-segment-crypt-wrong-sectorsize-2", "segment 0 sector_size = -1024",
     '.segments."0".sector_size = -1024'),
    ("luks2-segment-wrong-flags", 'segment 0 flags = "hello" (not an array)',
     '.segments."0".flags = "hello"'),
    ("luks2-segment-wrong-flags-element", 'segment 0 flags = ["hello", 1]',
     '.segments."0".flags = ["hello", 1]'),
    ("luks2-segment-wrong-backup-key-0", "a linear backup segment under id 2 (a gap at 1)",
     '.segments[(.segments | length + 1 | tostring)] = {"type": "linear", "offset": "512",'
     ' "size": "512", "flags": ["backup-x"]}'),
    ("luks2-segment-wrong-backup-key-1",
     "linear segments 1..64 and a backup segment under id 268435472",
     '(.segments."0".offset | tonumber) as $o | .segments[range(1; 65) | tostring] ='
     ' {"type": "linear", "offset": ($o + 512 | tostring), "size": "512"}'
     ' | .segments."268435472" = {"type": "linear", "offset": "512", "size": "512",'
     ' "flags": ["backup-x"]}'),
    ("luks2-segment-crypt-empty-encryption", 'segment 0 encryption = ""',
     '.segments."0".encryption = ""'),
]
for _name, _what, _program in _SEGMENT:
    json_case(_name, _what, INVALID, _program)

_OPEN_ONLY_CRYPT = ("qmpd reads a header to open or change the volume and understands only "
                    "'crypt' segments; cryptsetup loads (and dumps) a segment of unknown type "
                    "but cannot activate it either")
json_case("luks2-segment-unknown-type",
          "segment 0 replaced by {type: some_type, offset, size, a_field: 0}", VALID,
          '.segments."0" = {"type": "some_type", "offset": .segments."0".offset,'
          ' "size": .segments."0".size, "a_field": 0}', qmpd=INVALID, reason=_OPEN_ONLY_CRYPT)
json_case("luks2-segment-two",
          'segment 0 size 512, segment 1 {type: "some"} after it, dynamic', VALID,
          '.segments."0".size = "512" | .segments."1" = {"type": "some",'
          ' "offset": (.segments."0".offset | tonumber + 512 | tostring), "size": "dynamic"}',
          qmpd=INVALID, reason=_OPEN_ONLY_CRYPT)

# [6] config: keyslots_size, json_size, metadata sizes
json_case("luks2-invalid-keyslots-size-c0",
          "keyslots_size reaching 4096 bytes into the data segment", INVALID,
          '.config.keyslots_size = (.segments."0".offset | tonumber - ($ks | tonumber) + 4096'
          ' | tostring)', args={"ks": str(2 * HDR)})
json_case("luks2-invalid-keyslots-size-c1", "keyslots_size - 1 (not 4096-aligned)", INVALID,
          '.config.keyslots_size = (.config.keyslots_size | tonumber - 1 | tostring)')
json_case("luks2-invalid-keyslots-size-c2",
          "keyslots_size = the sum of the keyslot areas - 4096", INVALID,
          '.config.keyslots_size = ([.keyslots[].area.size] | map(tonumber) | add - 4096'
          ' | tostring)')
json_case("luks2-invalid-json-size-c0", "json_size = 12 KiB + 4096", INVALID,
          '.config.json_size = $v', args={"v": str(HDR - BIN + 4096)})
json_case("luks2-invalid-json-size-c1", "json_size = 12 KiB - 4096", INVALID,
          '.config.json_size = $v', args={"v": str(HDR - BIN - 4096)})


@case("luks2-invalid-json-size-c2",
      "both binary headers say 32 KiB, the JSON's json_size still says 12 KiB", INVALID)
def _(base: Base) -> Regions:
    primary, secondary = resized(base, 0x8000, base.json)
    return {0: primary, 0x8000: secondary}


def _metadata_size(label: str, size: int, *, secondary: bool) -> None:
    where = "secondary (primary killed)" if secondary else "primary (secondary killed)"

    def build(base: Base) -> Regions:
        primary, second = resized(base, size, moved_json(base, size))
        if secondary:
            primary = killed(primary)
        else:
            second = killed(second)
        return {0: primary, size: second}
    name = f"luks2-metadata-size-{label}" + ("-secondary" if secondary else "")
    CASES.append(Case(name, f"{size}-byte metadata, keyslot areas moved, valid in the {where}",
                      VALID, build))


for _label, _size in METADATA_SIZES.items():
    if _size != HDR:
        _metadata_size(_label, _size, secondary=False)
for _label, _size in METADATA_SIZES.items():
    _metadata_size(_label, _size, secondary=True)


def _metadata_64k(base: Base, text: str) -> Regions:
    primary, secondary = resized(base, 0x10000, text)
    return {0: primary, 0x10000: killed(secondary)}


@case("luks2-metadata-size-64k-inv-area-c0",
      "64 KiB metadata, keyslot areas moved one byte short: the first overlaps the JSON area",
      INVALID)
def _(base: Base) -> Regions:
    return _metadata_64k(base, moved_json(base, 0x10000, area_shift=2 * (0x10000 - HDR) - 1))


@case("luks2-metadata-size-64k-inv-area-c1",
      "64 KiB metadata, keyslot 7's area ending one byte past the keyslots area", INVALID)
def _(base: Base) -> Regions:
    text = jq(moved_json(base, 0x10000),
              '.keyslots."7".area.offset = ((.config.keyslots_size | tonumber) + ($mda | tonumber)'
              ' - (.keyslots."7".area.size | tonumber) + 1 | tostring)', mda=str(2 * 0x10000))
    return _metadata_64k(base, text)


@case("luks2-metadata-size-64k-inv-keyslots-size-c0",
      "64 KiB metadata, keyslots_size reaching 4096 bytes into the data segment", INVALID)
def _(base: Base) -> Regions:
    text = jq(moved_json(base, 0x10000), '.config.keyslots_size = $v',
              v=str(DATA_OFFSET - 2 * 0x10000 + 4096))
    return _metadata_64k(base, text)


@case("luks2-metadata-size-invalid",
      "1 MiB metadata but both binary headers say 2 GiB; secondary killed", INVALID)
def _(base: Base) -> Regions:
    size = 0x100000
    primary, secondary = resized(base, size, moved_json(base, size))
    primary = sealed(field(primary[:BIN], HDR_SIZE_OFFSET, 2 << 30), primary[BIN:])
    return {0: primary, size: killed(secondary)}


@case("luks2-metadata-size-invalid-secondary",
      "1 MiB metadata, primary killed, the secondary's binary header says 2 GiB", INVALID)
def _(base: Base) -> Regions:
    size = 0x100000
    primary, secondary = resized(base, size, moved_json(base, size))
    secondary = sealed(field(secondary[:BIN], HDR_SIZE_OFFSET, 2 << 30), secondary[BIN:])
    return {0: killed(primary), size: secondary}


# [7] objects of the wrong JSON type, in both copies
json_case("luks2-invalid-tokens", "tokens = 42", INVALID,
          'del(.tokens) | .tokens = 42', copies="both")
json_case("luks2-invalid-top-objects",
          'tokens = 42, digests = 42, keyslots = [], segments = "hi"', INVALID,
          'del(.tokens) | .tokens = 42 | del(.digests) | .digests = 42'
          ' | del(.keyslots) | .keyslots = [] | del(.segments) | .segments = "hi"',
          copies="both")
json_case("luks2-keyslot-invalid-area", "keyslot 0 area = 42", INVALID,
          'del(.keyslots."0".area) | .keyslots."0".area = 42', copies="both")
json_case("luks2-keyslot-invalid-area-size", 'keyslot 0 area size = "2^64 - 1"', INVALID,
          '.keyslots."0".area.size = $v', args={"v": str(UINT64_MAX)}, copies="both")
json_case("luks2-keyslot-invalid-objects", "keyslot 0 kdf = 42 and af = 42", INVALID,
          'del(.keyslots."0".kdf) | .keyslots."0".kdf = 42'
          ' | del(.keyslots."0".af) | .keyslots."0".af = 42', copies="both")
json_case("luks2-keyslot-invalid-af", "keyslot 0 af type = 42", INVALID,
          'del(.keyslots."0".af.type) | .keyslots."0".af.type = 42', copies="both")


# -- cases of our own, beyond cryptsetup's suite ---------------------------------
# Their ``expected`` is what cryptsetup 2.6.1's luksDump answers (checked by the
# test suite on every run, like the suite's own cases).

AT_USE = ("cryptsetup checks this field only when the keyslot or digest is used "
          "(luksDump loads it; unlocking with it fails or misbehaves); qmpd checks "
          "every field it will compute with when it reads the header")
KDF_BOUND = ("a bound against hostile headers: qmpd refuses KDF costs beyond "
             "cryptsetup's own limits (pbkdf2 iterations and argon2 time are uint32, "
             "argon2 memory at most 4 GiB) instead of running them; cryptsetup loads "
             "them and runs the KDF at unlock")
IDS = ("cryptsetup's loader takes any string of digits as an id, but its commands "
       "address keyslots and tokens as %d numbers below 32 (LUKS2_KEYSLOTS_MAX, "
       "LUKS2_TOKENS_MAX) and never write others; qmpd accepts only the ids a "
       "writer can address, in canonical form")
STRICT_JSON = ("cryptsetup's json-c parser is lenient (comments, single quotes, "
               "trailing commas, NaN, duplicate keys where the last wins, bytes that "
               "are not UTF-8) and cryptsetup never writes any of these; qmpd parses "
               "strict JSON (RFC 8259) so that every reader sees the same values")
ONLY_LUKS2 = ("qmpd reads a header to unlock or change it and understands only "
              "'luks2' keyslots and 'pbkdf2' digests (all cryptsetup 2.6 writes outside "
              "reencryption); cryptsetup loads other types and ignores them until used")


def ours(name: str, mutates: str, expected: str, program: str, **kw) -> None:
    json_case("qmpd-" + name, mutates, expected, program, origin="qmpd", **kw)


def ours_text(name: str, mutates: str, expected: str, edit: Callable[[str], str],
              **kw) -> None:
    """A case of ours that edits the JSON text of the primary (secondary killed)."""
    def build(base: Base) -> Regions:
        return primary_only(base, area(edit(base.json).encode("utf-8", "surrogateescape"),
                                       HDR - BIN))
    CASES.append(Case("qmpd-" + name, mutates, expected, build, origin="qmpd", **kw))


ours_text("whitespace-after-json", "spaces, tab, CR and LF after the closing brace", VALID,
          lambda j: j + " \t\r\n ")
ours_text("formfeed-after-json", "a form feed after the closing brace", INVALID,
          lambda j: j + "\f")
ours_text("newline-inside-json", "a newline and a tab between two members", VALID,
          lambda j: j.replace(',"tokens"', ',\n\t"tokens"', 1))
ours_text("duplicate-key", "config given twice (the second copy equal)", VALID,
          lambda j: j[:-1] + ',"config":' + jq(j, ".config") + "}",
          qmpd=INVALID, reason=STRICT_JSON)
ours_text("json-comment", "a /* comment */ between two members", VALID,
          lambda j: j.replace(',"tokens"', ',/* c */"tokens"', 1),
          qmpd=INVALID, reason=STRICT_JSON)
ours_text("json-trailing-comma", "a comma before the final closing brace", VALID,
          lambda j: j[:-1] + ",}", qmpd=INVALID, reason=STRICT_JSON)
ours_text("json-nan", 'a top-level member "x": NaN', VALID,
          lambda j: j[:-1] + ',"x":NaN}', qmpd=INVALID, reason=STRICT_JSON)
ours_text("json-not-utf8", "a token string holding the byte 0xff", VALID,
          lambda j: jq(j, '.tokens."0" = {"type": "dummy", "keyslots": [], "x": "AB"}')
          .replace('"AB"', '"A\udcffB"'), qmpd=INVALID, reason=STRICT_JSON)


@case("qmpd-sha512-checksum", "both copies sealed with checksum_alg sha512", VALID,
      origin="qmpd")
def _(base: Base) -> Regions:
    def sha512(binary: bytes, json_area: bytes) -> bytes:
        return sealed(field(binary, CSUM_ALG_OFFSET, b"sha512".ljust(32, b"\0")), json_area)
    return {0: sha512(base.hdr0, area(base.json, HDR - BIN)),
            HDR: sha512(base.hdr1, base.area1)}


@case("qmpd-secondary-wrong-hdr-offset", "secondary's hdr_offset = 0, primary killed",
      INVALID, origin="qmpd")
def _(base: Base) -> Regions:
    return {0: killed(base.hdr0), HDR: sealed(field(base.hdr1, HDR_OFFSET_OFFSET, 0), base.area1)}


@case("qmpd-primary-wrong-hdr-offset", "primary's hdr_offset = 16384, secondary intact",
      VALID, origin="qmpd")
def _(base: Base) -> Regions:
    return {0: sealed(field(base.hdr0, HDR_OFFSET_OFFSET, HDR), area(base.json, HDR - BIN))}


@case("qmpd-version-3-alone", "primary version = 3, secondary killed", INVALID, origin="qmpd")
def _(base: Base) -> Regions:
    return {0: sealed(field(base.hdr0, 6, b"\0\x03"), area(base.json, HDR - BIN)),
            HDR: killed(original_secondary(base))}


@case("qmpd-primary-version-1", "primary version = 1 (a LUKS1 image), secondary intact",
      INVALID, origin="qmpd")
def _(base: Base) -> Regions:
    return {0: sealed(field(base.hdr0, 6, b"\0\x01"), area(base.json, HDR - BIN))}


@case("qmpd-primary-version-3", "primary version = 3, secondary intact", VALID,
      origin="qmpd")
def _(base: Base) -> Regions:
    return {0: sealed(field(base.hdr0, 6, b"\0\x03"), area(base.json, HDR - BIN))}


@case("qmpd-secondary-newer", "secondary sealed with seqid + 5 and a label", VALID,
      origin="qmpd")
def _(base: Base) -> Regions:
    seqid = struct.unpack_from(">Q", base.hdr1, 16)[0]
    hdr1 = field(field(base.hdr1, 16, seqid + 5), 24, b"newer".ljust(48, b"\0"))
    return {HDR: sealed(hdr1, base.area1)}


def _renumbered(slot: str) -> str:
    return (f'.keyslots."{slot}" = .keyslots."7" | del(.keyslots."7")'
            f' | .digests."0".keyslots |= map(if . == "7" then "{slot}" else . end)')


ours("segment-in-two-digests", "digest 1 = a copy of digest 0 listing no keyslots",
     VALID, '.digests."1" = .digests."0" | .digests."1".keyslots = []')
ours("token-missing-type", "a token without type", INVALID,
     '.tokens."0" = {"keyslots": ["0"]}')
ours("token-keyslots-not-array", 'a token with keyslots = "0"', INVALID,
     '.tokens."0" = {"type": "dummy", "keyslots": "0"}')
ours("token-unknown-with-extras", "a token of unknown type with extra members", VALID,
     '.tokens."3" = {"type": "dummy", "keyslots": ["1"], "extra": {"a": [1, 2]}}')
ours("token-id-32", "a token under id 32", VALID,
     '.tokens."32" = {"type": "dummy", "keyslots": []}', qmpd=INVALID, reason=IDS)
ours("keyslot-id-32", "keyslot 7 renumbered 32", VALID, _renumbered("32"),
     qmpd=INVALID, reason=IDS)
ours("keyslot-id-01", 'keyslot 7 renumbered "01"', VALID, _renumbered("01"),
     qmpd=INVALID, reason=IDS)
ours("keyslot-id-empty", 'keyslot 7 renumbered ""', VALID, _renumbered(""),
     qmpd=INVALID, reason=IDS)
ours("keyslot-id-letters", 'keyslot 7 renumbered "x7"', INVALID, _renumbered("x7"))
ours("requirements-unknown", 'config requirements mandatory = ["future-feature"]', VALID,
     '.config.requirements = {"mandatory": ["future-feature"]}')
ours("config-flags-unknown", 'config flags = ["allow-discards", "future-flag"]', VALID,
     '.config.flags = ["allow-discards", "future-flag"]')
ours("config-flags-not-array", 'config flags = "allow-discards"', INVALID,
     '.config.flags = "allow-discards"')
ours("config-missing", "config removed", INVALID, 'del(.config)')
ours("json-size-number", "config json_size as a number", INVALID,
     '.config.json_size = (.config.json_size | tonumber)')
ours("keyslots-empty", "no keyslots, digest 0 lists none", VALID,
     '.keyslots = {} | .digests."0".keyslots = []')
ours("keyslots-size-zero", "no keyslots and keyslots_size 0", VALID,
     '.keyslots = {} | .digests."0".keyslots = [] | .config.keyslots_size = "0"')
ours("segments-empty", "no segments, digest 0 lists none", INVALID,
     '.segments = {} | .digests."0".segments = []')
ours("segment-offset-unaligned", "segment 0 offset = data offset + 1", INVALID,
     '.segments."0".offset = (.segments."0".offset | tonumber + 1 | tostring)')
ours("segment-size-unaligned-to-sector", 'segment 0 sector_size 4096, size "512"', INVALID,
     '.segments."0".sector_size = 4096 | .segments."0".size = "512"')
ours("segment-size-zero", 'segment 0 size "0"', INVALID, '.segments."0".size = "0"')
ours("segment-in-keyslots-area", "segment 0 offset = 1 MiB (inside the keyslots area)",
     INVALID, '.segments."0".offset = "1048576"')
ours("segment-offset-zero", 'segment 0 offset "0" in a header that is not detached', VALID,
     '.segments."0".offset = "0"', qmpd=INVALID,
     reason="offset 0 marks a detached header: cryptsetup accepts it in any header, qmpd "
            "only when told the header is detached (read_luks2(detached_header=True)), "
            "since on this image the data would overwrite the metadata")
ours("segment-integrity-partial", 'segment 0 integrity = {"type": "hmac(sha256)"} only',
     INVALID, '.segments."0".integrity = {"type": "hmac(sha256)"}')
ours("keyslot-area-unaligned", "keyslot 7 area offset + 1 (not 4096-aligned), still free",
     VALID, '.keyslots."7".area.offset = (.keyslots."7".area.offset | tonumber + 1 | tostring)')
ours("keyslot-unknown-type", 'keyslot 7 type = "future"', VALID,
     '.keyslots."7".type = "future"', qmpd=INVALID, reason=ONLY_LUKS2)
ours("keyslot-priority-3", "keyslot 0 priority = 3", VALID, '.keyslots."0".priority = 3',
     qmpd=INVALID, reason="cryptsetup loads any priority but tries a keyslot only when it "
                          "is 1 (normal) or 2 (prefer); qmpd refuses a priority outside "
                          "0..2 rather than guess what it means")
ours("keyslot-key-size-string", 'keyslot 0 key_size = "64"', INVALID,
     '.keyslots."0".key_size = "64"')
ours("keyslot-key-size-bool", "keyslot 0 key_size = true", INVALID,
     '.keyslots."0".key_size = true')
ours("keyslot-key-size-0", "keyslot 7 key_size = 0", VALID, '.keyslots."7".key_size = 0',
     qmpd=INVALID, reason=AT_USE)
ours("keyslot-area-too-small", 'keyslot 7 area size = "4096" (too small for the key)',
     VALID, '.keyslots."7".area.size = "4096"', qmpd=INVALID,
     reason="cryptsetup reads the keyslot's 256000 bytes of key material whatever the "
            "area says, into whatever follows; qmpd refuses an area smaller than its key "
            "material")
ours("keyslot-stripes-1000", "keyslot 0 af stripes = 1000", VALID,
     '.keyslots."0".af.stripes = 1000', qmpd=INVALID,
     reason="cryptsetup 2.6 ignores the stored count and always merges 4000 stripes; qmpd "
            "refuses a header that claims another count rather than guess which is meant")
ours("digest-unknown-type", 'digest 0 type = "future"', VALID,
     '.digests."0".type = "future"', qmpd=INVALID, reason=ONLY_LUKS2)
ours("digest-salt-not-base64", 'digest 0 salt = "!!"', VALID, '.digests."0".salt = "!!"',
     qmpd=INVALID, reason=AT_USE)
ours("kdf-pbkdf2-iterations-2^32", "keyslot 0 pbkdf2 iterations = 2^32", VALID,
     '.keyslots."0".kdf.iterations = 4294967296', qmpd=INVALID, reason=KDF_BOUND)
ours("kdf-argon2-memory-4GiB+1", "keyslot 1 argon2 memory = 4 GiB + 1 KiB", VALID,
     '.keyslots."1".kdf.memory = 4194305', qmpd=INVALID, reason=KDF_BOUND)


# -- building -------------------------------------------------------------------

def build(directory: Path, base_image: Path | None = None) -> list[dict]:
    """Write every case's image and manifest.json into ``directory``.

    The base image is made with cryptsetup unless one is given. Returns the
    manifest's entries, each with ``image`` (the file name) added.
    """
    directory.mkdir(parents=True, exist_ok=True)
    base_path = base_image or make_base(directory)
    base = read_base(base_path)
    names = [c.name for c in CASES]
    if len(set(names)) != len(names):
        raise ValueError("duplicate case names")
    entries = []
    for item in CASES:
        image = f"{item.name}.img"
        write_image(directory / image, base, item.build(base))
        entries.append(item.manifest() | {"image": image})
    manifest = {"base": base_path.name, "cryptsetup": "2.6", "cases": entries}
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("directory", type=Path)
    entries = build(parser.parse_args().directory)
    print(f"{len(entries)} cases")


if __name__ == "__main__":
    main()
