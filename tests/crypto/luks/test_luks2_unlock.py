"""LUKS2 unlock against cryptsetup: keyslot KDFs, priorities, the data IV rule.

cryptsetup makes every image (luksFormat, luksAddKey, config) and says
what the volume key is (luksDump --dump-volume-key). For the data
segment's IVs it also makes the ciphertext: ``reencrypt --encrypt
--force-offline-reencrypt`` with a detached header encrypts a file of
known plaintext in userspace, no device-mapper needed, with the same IV
rule dm-crypt applies when the volume is opened.
"""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import pytest

from qmpd.crypto import afsplit, pbkdf
from qmpd.crypto.ciphers import SectorCipher
from qmpd.crypto.errors import CryptoError
from qmpd.crypto.luks import luks2_unlock
from qmpd.crypto.luks.luks2_header import read_luks2
from qmpd.crypto.luks.luks2_unlock import (
    WRONG_PASSPHRASE,
    keyslot_order,
    segment_cipher,
    unlock_luks2,
)
from tests.oracles import cryptsetup_unlocks, cryptsetup_volume_key, require, run

PW1 = b"first passphrase \xc3\xa9"
PW2 = b"second-secret-2"
WRONG = b"not the passphrase"

PBKDF2 = ("--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000")
ARGON2ID = ("--pbkdf", "argon2id", "--pbkdf-memory", "32", "--pbkdf-force-iterations", "4",
            "--pbkdf-parallel", "1")
ARGON2I = ("--pbkdf", "argon2i", "--pbkdf-memory", "32", "--pbkdf-force-iterations", "4",
           "--pbkdf-parallel", "2")


def cryptsetup(*args: str | Path) -> None:
    run([require("cryptsetup"), *map(str, args)])


def key_file(directory: Path, passphrase: bytes) -> Path:
    path = directory / f"key-{passphrase.hex()}"
    path.write_bytes(passphrase)
    return path


def reader(path: Path):
    data = path.read_bytes()
    return lambda offset, length: data[offset:offset + length]


def open_image(path: Path, *, detached: bool = False):
    read = reader(path)
    return read, read_luks2(read, detached_header=detached)


def make_image(directory: Path, name: str, format_args: tuple[str, ...],
               add_args: tuple[str, ...] | None = None) -> Path:
    """PW1 in keyslot 0 and, if add_args is given, PW2 in keyslot 1."""
    image = directory / name
    image.write_bytes(b"")
    with open(image, "r+b") as f:
        f.truncate(16 * 1024 * 1024)
    cryptsetup("luksFormat", "--type", "luks2", "--batch-mode",
               "--key-file", key_file(directory, PW1), *format_args, image)
    if add_args is not None:
        cryptsetup("luksAddKey", "--batch-mode", "--key-file", key_file(directory, PW1),
                   *add_args, image, key_file(directory, PW2))
    return image


KDF_CASES = {
    "pbkdf2-sha256": (PBKDF2, PBKDF2),
    "pbkdf2-sha512-cbc-essiv-keyslot": (
        (*PBKDF2, "--hash", "sha512", "--keyslot-cipher", "aes-cbc-essiv:sha256",
         "--keyslot-key-size", "256"),
        (*PBKDF2, "--hash", "sha512")),
    "argon2id": (ARGON2ID, ARGON2ID),
    "argon2i-2-lanes": (ARGON2I, ARGON2I),
    "argon2id-then-pbkdf2": (ARGON2ID, PBKDF2),
}


@pytest.fixture(scope="module", params=sorted(KDF_CASES))
def kdf_image(request, tmp_path_factory) -> Path:
    require("cryptsetup")
    format_args, add_args = KDF_CASES[request.param]
    return make_image(tmp_path_factory.mktemp("luks2"), "img", format_args, add_args)


def test_unlock_gives_cryptsetups_volume_key(kdf_image: Path) -> None:
    read, header = open_image(kdf_image)
    expected = cryptsetup_volume_key(str(kdf_image), PW1)
    assert cryptsetup_volume_key(str(kdf_image), PW2) == expected
    for passphrase, slot in ((PW1, 0), (bytearray(PW2), 1)):
        key, index = unlock_luks2(read, header, passphrase)
        assert (bytes(key), index) == (expected, slot)
        assert isinstance(key, bytearray)


def test_wrong_passphrase(kdf_image: Path) -> None:
    read, header = open_image(kdf_image)
    with pytest.raises(CryptoError) as info:
        unlock_luks2(read, header, WRONG)
    assert str(info.value) == WRONG_PASSPHRASE
    assert info.value.__cause__ is None and info.value.__context__ is None
    with pytest.raises(CryptoError, match=WRONG_PASSPHRASE):
        unlock_luks2(read, header, b"")


def test_kdf_parameters_reach_the_kdf(kdf_image: Path) -> None:
    """The images really use what their names say (else the cases prove less)."""
    _, header = open_image(kdf_image)
    kinds = {slot.kdf.type for slot in header.keyslots.values()}
    assert kinds <= {"pbkdf2", "argon2i", "argon2id"} and kinds
    for slot in header.keyslots.values():
        if slot.kdf.type != "pbkdf2":
            assert slot.kdf.memory == 32 and slot.kdf.time == 4   # type: ignore[union-attr]


# -- priorities ----------------------------------------------------------------

@pytest.fixture
def twice(tmp_path: Path) -> Path:
    """PW1 in keyslots 0 and 1."""
    image = make_image(tmp_path, "img", PBKDF2)
    cryptsetup("luksAddKey", "--batch-mode", "--key-file", key_file(tmp_path, PW1), *PBKDF2,
               image, key_file(tmp_path, PW1))
    return image


def set_priority(image: Path, slot: int, priority: str) -> None:
    cryptsetup("config", "--priority", priority, "--key-slot", str(slot), image)


def test_priority_order_is_cryptsetups(twice: Path) -> None:
    volume_key = cryptsetup_volume_key(str(twice), PW1)
    read, header = open_image(twice)
    assert keyslot_order(header) == [0, 1]
    assert unlock_luks2(read, header, PW1)[1] == 0

    set_priority(twice, 1, "prefer")
    read, header = open_image(twice)
    assert header.keyslots[1].priority == 2
    assert keyslot_order(header) == [1, 0]
    assert unlock_luks2(read, header, PW1)[1] == 1

    set_priority(twice, 1, "normal")
    set_priority(twice, 0, "ignore")
    read, header = open_image(twice)
    assert keyslot_order(header) == [1]
    assert unlock_luks2(read, header, PW1)[1] == 1

    set_priority(twice, 1, "ignore")
    read, header = open_image(twice)
    assert keyslot_order(header) == []
    with pytest.raises(CryptoError, match=f"^{WRONG_PASSPHRASE}$"):
        unlock_luks2(read, header, PW1)
    assert not cryptsetup_unlocks(str(twice), PW1)   # cryptsetup agrees
    # Asked for by number, an ignored slot still opens.
    key, index = unlock_luks2(read, header, PW1, keyslot=0)
    assert (bytes(key), index) == (volume_key, 0)
    with pytest.raises(CryptoError, match="keyslot 5 is not active"):
        unlock_luks2(read, header, PW1, keyslot=5)


# -- the data segment: IVs counted in 512-byte units --------------------------

DATA_SIZE = 256 * 1024


def known_plaintext() -> bytes:
    """Every 512-byte unit tagged with its number: a wrong IV rule cannot pass."""
    return b"".join(struct.pack("<Q", i) * 64 for i in range(DATA_SIZE // 512))


@pytest.mark.parametrize("sector_size", [512, 1024, 4096])
@pytest.mark.parametrize("cipher,key_bits", [("aes-xts-plain64", 512),
                                             ("aes-cbc-essiv:sha256", 256),
                                             ("aes-xts-plain", 256)])
def test_data_ivs_match_cryptsetup(tmp_path: Path, cipher: str, key_bits: int,
                                   sector_size: int) -> None:
    plaintext = known_plaintext()
    data = tmp_path / "data"
    data.write_bytes(plaintext)
    detached = tmp_path / "header"
    cryptsetup("reencrypt", "--encrypt", "--type", "luks2", "--batch-mode",
               "--force-offline-reencrypt", "--header", detached,
               "--key-file", key_file(tmp_path, PW1), *PBKDF2,
               "--cipher", cipher, "--key-size", str(key_bits),
               "--sector-size", str(sector_size), data)
    ciphertext = data.read_bytes()
    assert len(ciphertext) == DATA_SIZE and ciphertext != plaintext

    read, header = open_image(detached, detached=True)
    segment = header.segments[0]
    assert (segment.offset, segment.sector_size, segment.encryption, segment.iv_tweak) == (
        0, sector_size, cipher, 0)
    key, _ = unlock_luks2(read, header, PW1)
    assert bytes(key) == cryptsetup_volume_key(str(detached), PW1)

    payload = segment_cipher(header, key)
    assert payload.sector_size == sector_size
    assert payload.decrypt(0, ciphertext) == plaintext
    assert payload.encrypt(0, plaintext) == ciphertext
    # Part way in: sector numbers count sector_size units.
    third = 3 * sector_size
    assert payload.decrypt(3, ciphertext[third:third + sector_size]) == \
        plaintext[third:third + sector_size]
    if sector_size > 512:
        # dm-crypt's iv_large_sectors rule (IV = sector in sector_size units)
        # is not what cryptsetup wrote.
        large = SectorCipher(payload.spec, key, sector_size=sector_size, iv_shift=0)
        assert large.decrypt(0, ciphertext) != plaintext
        large.wipe()
    # iv_tweak (dm-crypt's iv_offset, 512-byte units): a segment that starts
    # j sectors later with iv_tweak j * sector_size / 512 reads the same
    # plaintext from cryptsetup's ciphertext there.
    j = 5
    tweaked = dataclasses.replace(header, segments={0: dataclasses.replace(
        segment, offset=j * sector_size, iv_tweak=j * sector_size // 512)})
    shifted = segment_cipher(tweaked, key)
    start = j * sector_size
    assert shifted.decrypt(0, ciphertext[start:]) == plaintext[start:]
    assert shifted.encrypt(2, plaintext[start + 2 * sector_size:start + 4 * sector_size]) == \
        ciphertext[start + 2 * sector_size:start + 4 * sector_size]
    shifted.wipe()
    payload.wipe()


@pytest.fixture(scope="module")
def plain_image(tmp_path_factory) -> Path:
    require("cryptsetup")
    return make_image(tmp_path_factory.mktemp("luks2"), "img", PBKDF2)


def test_integrity_and_unknown_encryption_refused(plain_image: Path) -> None:
    read, header = open_image(plain_image)
    key, _ = unlock_luks2(read, header, PW1)
    segment_cipher(header, key).wipe()
    size = header.segments[0].sector_size      # IVs count 512-byte units
    wraps = dataclasses.replace(header, segments={   # iv_tweak near 2**64 wraps, as dm-crypt
        0: dataclasses.replace(header.segments[0], iv_tweak=(1 << 64) - size // 512)})
    near, zero = segment_cipher(wraps, key), segment_cipher(header, key)
    block = bytes(size)
    assert near.encrypt(1, block) == zero.encrypt(0, block)
    near.wipe()
    zero.wipe()
    integrity = dataclasses.replace(header, segments={
        0: dataclasses.replace(header.segments[0], integrity={"type": "hmac(sha256)"})})
    with pytest.raises(CryptoError, match="integrity"):
        segment_cipher(integrity, key)
    odd = dataclasses.replace(header, segments={
        0: dataclasses.replace(header.segments[0], encryption="aes")})
    with pytest.raises(CryptoError, match="LUKS2 segment 0 encryption 'aes' is not supported"):
        segment_cipher(odd, key)


# -- failures, secrets, wiping ------------------------------------------------

def test_truncated_area_and_unsupported_area_cipher(plain_image: Path) -> None:
    read, header = open_image(plain_image)
    area = header.keyslots[0].area

    def short(offset: int, length: int) -> bytes:
        return read(offset, min(length, max(0, area.offset + 4096 - offset)))
    with pytest.raises(CryptoError, match="Cannot read the key material of LUKS2 keyslot 0"):
        unlock_luks2(short, header, PW1)

    serpent = dataclasses.replace(header, keyslots={0: dataclasses.replace(
        header.keyslots[0], area=dataclasses.replace(area, encryption="serpent-xts-plain64"))})
    with pytest.raises(CryptoError, match="LUKS2 keyslot 0 area: .*[Ss]erpent") as info:
        unlock_luks2(read, serpent, PW1)
    assert PW1.decode("utf-8") not in str(info.value)


def test_secrets_never_in_texts(plain_image: Path) -> None:
    read, header = open_image(plain_image)
    key, _ = unlock_luks2(read, header, PW1)
    shown = [repr(header), repr(header.keyslots[0]), repr(header.digests[0])]
    for passphrase in (PW2, bytearray(b"pass\x00phrase"), b"x" * 600):
        with pytest.raises(CryptoError) as info:
            unlock_luks2(read, header, passphrase)
        shown.append(str(info.value))
        shown.append(repr(info.value))
    cipher = segment_cipher(header, key)
    shown.append(repr(cipher))
    text = "\n".join(shown)
    for secret in (PW1, PW2, bytes(key), header.keyslots[0].kdf.salt,
                   header.digests[0].digest):
        assert secret.hex() not in text and repr(secret)[2:-1] not in text
    assert PW1.decode("utf-8") not in text and PW2.decode() not in text
    cipher.wipe()


@pytest.mark.parametrize("passphrase", [PW1, WRONG], ids=["right", "wrong"])
def test_intermediate_keys_are_wiped(monkeypatch, kdf_image: Path, passphrase: bytes) -> None:
    """Every area key, merged candidate and digest the unlock makes ends zeroed,
    except the volume key handed back."""
    read, header = open_image(kdf_image)
    made: list[bytearray] = []

    def recording(function):
        def wrapper(*args, **kwargs):
            out = function(*args, **kwargs)
            made.append(out)
            return out
        return wrapper

    monkeypatch.setattr(pbkdf, "pbkdf2", recording(pbkdf.pbkdf2))
    monkeypatch.setattr(afsplit, "af_merge", recording(afsplit.af_merge))
    monkeypatch.setattr(luks2_unlock, "argon2", recording(luks2_unlock.argon2))
    try:
        key, _ = unlock_luks2(read, header, passphrase)
    except CryptoError:
        key = None
    assert (key is None) == (passphrase == WRONG)
    # per slot tried: an area key, a candidate, a digest
    assert len(made) >= 3
    for buffer in made:
        if buffer is not key:
            assert not any(buffer), "an intermediate key was left unwiped"
