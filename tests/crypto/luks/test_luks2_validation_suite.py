"""cryptsetup's LUKS2 header-validation suite, ported: qmpd accepts and refuses
what cryptsetup 2.6 does.

The cases are built once per session by tests/tools/luks2_validation_cases.py
(from one image cryptsetup formats, edited with jq and written with xxd; its
docstring says how). For every case:

- cryptsetup's verdict is ``cryptsetup luksDump --type luks2``'s exit
  status, as in cryptsetup's own tests/luks2-validation-test (which leaves
  out ``--type``: the LUKS version is qmpd's probe_version's business, not
  the reader's), and must be the manifest's ``expected`` (so a case that
  stops testing what it claims is noticed);
- qmpd's verdict (:func:`read_luks2`) must be cryptsetup's, or the manifest's
  documented exception; a refusal is a CryptoError with a clear text, never
  another exception; where both accept, both chose the same copy (epoch and
  metadata size).

luksDump repairs a bad copy on disk, so it runs on a sparse copy of the case.
A hypothesis test then mutates the real header at random and checks that
qmpd never accepts what cryptsetup refuses, and that an accepted header
either unlocks to cryptsetup's volume key or fails with a CryptoError.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from qmpd.crypto.errors import CryptoError
from qmpd.crypto.luks.luks2_header import Argon2, Luks2Header, Pbkdf2, read_luks2
from qmpd.crypto.luks.luks2_unlock import unlock_luks2
from qmpd.crypto.secrets import wipe
from tests import oracles
from tests.tools import luks2_validation_cases as cases_tool

pytestmark = pytest.mark.interop

CASES = {case.name: case for case in cases_tool.CASES}
PYTHON_NAME = re.compile(r"Traceback|\b[A-Za-z_]*(?:Error|Exception)\b|\bNone\b|<[a-z]")


@pytest.fixture(scope="session")
def suite(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    for tool in ("cryptsetup", "jq", "xxd"):
        oracles.require(tool)
    directory = tmp_path_factory.mktemp("luks2-validation")
    entries = cases_tool.build(directory)
    return directory, {entry["name"]: entry for entry in entries}


def sparse_copy(source: Path, target: Path) -> None:
    """Copy only the data extents (the images are 17 MiB, mostly holes)."""
    size = source.stat().st_size
    with open(source, "rb") as src, open(target, "wb") as dst:
        dst.truncate(size)
        fd, at = src.fileno(), 0
        while at < size:
            try:
                start = os.lseek(fd, at, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            dst.seek(start)
            dst.write(os.pread(fd, end - start, start))
            at = end


def file_reader(path: Path):
    data = path.open("rb")

    def read(offset: int, length: int) -> bytes:
        return os.pread(data.fileno(), length, offset)
    return data, read


def qmpd_verdict(path: Path, **kw) -> Luks2Header | CryptoError:
    handle, read = file_reader(path)
    with handle:
        try:
            return read_luks2(read, **kw)
        except CryptoError as err:
            return err
        except Exception as err:        # an internal error is the failure under test
            pytest.fail(f"read_luks2 raised {type(err).__name__}: {err}")


def assert_clear(err: CryptoError) -> None:
    text = str(err)
    assert text.strip(), "a refusal without a text"
    assert not PYTHON_NAME.search(text), f"refusal text shows Python internals: {text!r}"


def luks_dump(path: Path) -> tuple[bool, dict[str, str]]:
    proc = oracles.run(["cryptsetup", "luksDump", "--type", "luks2", str(path)], check=False)
    fields = {}
    for line in proc.stdout.decode(errors="replace").splitlines():
        if ":" in line and not line.startswith(("\t", " ")):
            key, value = line.split(":", 1)
            fields[key.strip()] = value.strip()
    return proc.returncode == 0, fields


def verdict(result: object) -> str:
    return cases_tool.VALID if isinstance(result, Luks2Header) else cases_tool.INVALID


@pytest.mark.parametrize("name", list(CASES))
def test_case(suite, name, tmp_path):
    directory, entries = suite
    entry = entries[name]
    image = directory / entry["image"]
    ours = qmpd_verdict(image)
    if isinstance(ours, CryptoError):
        assert_clear(ours)
    copy = tmp_path / "copy.img"
    sparse_copy(image, copy)
    accepted, dump = luks_dump(copy)
    theirs = cases_tool.VALID if accepted else cases_tool.INVALID
    assert theirs == entry["expected"], (
        f"cryptsetup says {theirs}, the manifest expects {entry['expected']}: "
        f"the case no longer tests what it says ({entry['mutates']})")
    wanted = entry.get("qmpd", theirs)
    assert verdict(ours) == wanted, (
        f"qmpd says {verdict(ours)} ({ours}), cryptsetup {theirs}"
        + (f"; documented exception: {entry['reason']}" if "qmpd" in entry else ""))
    if isinstance(ours, Luks2Header) and accepted:
        assert int(dump["Epoch"]) == ours.seqid
        assert dump["Metadata area"] == f"{ours.hdr_size} [bytes]"


def test_manifest_covers_cryptsetups_suite(suite):
    directory, entries = suite
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["cryptsetup"] == "2.6"
    theirs = [e for e in manifest["cases"] if e["origin"] == "cryptsetup"]
    # tests/luks2-validation-test of cryptsetup 2.6 runs 83 images.
    assert len(theirs) == 83
    assert sum(e["expected"] == "valid" for e in theirs) == 28      # its "R" lines
    for entry in manifest["cases"]:
        assert entry["mutates"] and entry["expected"] in ("valid", "invalid")
        assert (directory / entry["image"]).stat().st_size == cases_tool.IMAGE_SIZE
        if "qmpd" in entry:
            # An exception is only ever qmpd being stricter, and says why.
            assert (entry["expected"], entry["qmpd"]) == ("valid", "invalid")
            assert len(entry["reason"]) > 40
    exceptions = {e["name"] for e in theirs if "qmpd" in e}
    assert exceptions == {"luks2-segment-unknown-type", "luks2-segment-two"}


def test_detached_header_takes_segment_offset_zero(suite):
    directory, entries = suite
    image = directory / entries["qmpd-segment-offset-zero"]["image"]
    assert isinstance(qmpd_verdict(image), CryptoError)
    header = qmpd_verdict(image, detached_header=True)
    assert isinstance(header, Luks2Header) and header.segments[0].offset == 0


# -- random mutations of the real header -------------------------------------------

@dataclass(frozen=True)
class RealImage:
    """The base image's metadata and keyslots (not its data), its header, and the
    volume key cryptsetup reports."""
    data: bytes = field(repr=False)
    header: Luks2Header = field(repr=False)
    volume_key: bytes = field(repr=False)


@pytest.fixture(scope="session")
def real_image(suite) -> RealImage:
    directory, _ = suite
    path = directory / "luks2-valid.img"
    header = qmpd_verdict(path)
    assert isinstance(header, Luks2Header)
    data = path.read_bytes()[:header.keyslots_end]
    key = oracles.cryptsetup_volume_key(str(path), cases_tool.passphrase(0))
    return RealImage(data, header, key)


def _paths(node, path=()):
    yield path
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, path + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, path + (i,))


def _retyped(value):
    if isinstance(value, str):
        return int(value) if value.isdigit() else [value]
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return {str(i): v for i, v in enumerate(value)}
    if isinstance(value, dict):
        return list(value.values())
    return "null"


SCALARS = (st.none() | st.booleans() | st.integers(-2, 1 << 65)
           | st.sampled_from(["", "0", "7", "dynamic", "4096", "-1", "01",
                              "18446744073709551615", "18446744073709551616",
                              "aes-xts-plain64", "sha256", "argon2id", "luks2", "crypt"]))
EDIT = st.tuples(st.integers(0, 10 ** 6), st.sampled_from(["delete", "replace", "retype",
                                                             "copy"]), SCALARS)


def _edit(meta: dict, choice: int, op: str, value) -> None:
    paths = [p for p in _paths(meta) if p]
    if not paths:
        return
    path = paths[choice % len(paths)]
    parent = meta
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    if op == "delete":
        del parent[last]
    elif op == "replace":
        parent[last] = value
    elif op == "retype":
        parent[last] = _retyped(parent[last])
    elif isinstance(parent, dict):     # copy the member under a new decimal id
        parent[str(choice % 40)] = json.loads(json.dumps(parent[last]))


def _image(data: bytes, hdr_size: int, text: bytes) -> bytes:
    raw = cases_tool.area(text[:hdr_size - 4096], hdr_size - 4096)
    primary = cases_tool.sealed(data[:4096], raw)
    secondary = cases_tool.sealed(data[hdr_size:hdr_size + 4096], raw)
    return primary + secondary + data[2 * hdr_size:]


def _cheap(header: Luks2Header) -> bool:
    """Every KDF small enough to run in a test."""
    for slot in header.keyslots.values():
        kdf = slot.kdf
        if isinstance(kdf, Pbkdf2) and kdf.iterations > 20000:
            return False
        if isinstance(kdf, Argon2) and (kdf.memory > 4096 or kdf.time > 16 or kdf.cpus > 4):
            return False
    return True


def _check_mutant(real_image, tmp_path: Path, image: bytes) -> None:
    volume_key = real_image.volume_key
    try:
        header = read_luks2(lambda offset, length: image[offset:offset + length])
    except CryptoError as err:
        assert_clear(err)
        event("qmpd refuses")
        return
    # qmpd is never more permissive than cryptsetup.
    path = tmp_path / "mutant.img"
    with open(path, "wb") as f:        # the metadata; keyslot areas and data are holes
        f.write(image[:2 * max(header.hdr_size, cases_tool.HDR)])
        f.truncate(cases_tool.IMAGE_SIZE)
    accepted, dump = luks_dump(path)
    assert accepted, "qmpd accepted a header cryptsetup refuses"
    assert int(dump["Epoch"]) == header.seqid
    # An accepted header opens correctly or refuses clearly.
    if not _cheap(header):
        event("accepted; KDF too costly to run")
        return
    try:
        key, _ = unlock_luks2(lambda offset, length: image[offset:offset + length], header,
                              cases_tool.passphrase(0))
    except CryptoError as err:
        assert_clear(err)
        event("accepted; unlock refused")
        return
    event("accepted; unlocked")
    try:
        assert bytes(key) == volume_key
    finally:
        wipe(key)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(EDIT, min_size=1, max_size=3))
def test_random_json_edits(real_image, tmp_path, edits):
    data, header = real_image.data, real_image.header
    meta = json.loads(json.dumps(header.metadata))
    for choice, op, value in edits:
        _edit(meta, choice, op, value)
    text = json.dumps(meta, separators=(",", ":")).encode()
    _check_mutant(real_image, tmp_path, _image(data, header.hdr_size, text))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 4096 + 6000), st.integers(1, 255)),
                min_size=1, max_size=4), st.booleans())
def test_random_byte_flips_with_checksum_recomputed(real_image, tmp_path, flips, both):
    """Flips in the binary header and the JSON text (which ends before byte
    4096 + 6000) of the primary, or of both copies, each copy resealed."""
    data, header = real_image.data, real_image.header
    hdr = header.hdr_size
    copies = []
    for start in (0, hdr):
        copy = bytearray(data[start:start + hdr])
        if start == 0 or both:
            for offset, mask in flips:
                if not 448 <= offset < 512:        # the checksum is recomputed, not flipped
                    copy[offset] ^= mask
        alg = bytes(copy[72:104]).split(b"\0", 1)[0].decode("ascii", "replace")
        if alg in ("sha1", "sha256", "sha384", "sha512"):
            copy[:] = cases_tool.sealed(bytes(copy[:4096]), bytes(copy[4096:]))
        copies.append(bytes(copy))
    _check_mutant(real_image, tmp_path, copies[0] + copies[1] + data[2 * hdr:])

