import hashlib
import os

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings, strategies as st

from qmpd.crypto.ciphers import (
    CipherSpec, SectorCipher, check_cipher_supported, format_luks_cipher,
    parse_luks_cipher,
)
from qmpd.crypto.errors import CryptoError

XTS256 = CipherSpec("aes-256", "xts", "plain64", None)


def spec_supported(spec):
    try:
        check_cipher_supported(spec)
    except CryptoError:
        return False
    return True


# --- known answers -----------------------------------------------------------

def test_ieee1619_vector_1_zero_key():
    # Both key halves equal: OpenSSL refuses, the ECB-built XTS answers.
    spec = CipherSpec("aes-128", "xts", "plain64")
    cipher = SectorCipher(spec, bytes(32))
    out = cipher.encrypt(0, bytes(32))
    assert out.hex() == ("917cf69ebd68b2ec9b9fe9a3eadda692"
                         "cd43d2f59598ed858c02c2652fbf922e")
    assert cipher.decrypt(0, out) == bytes(32)


def test_ieee1619_vector_2():
    spec = CipherSpec("aes-128", "xts", "plain64")
    cipher = SectorCipher(spec, b"\x11" * 16 + b"\x22" * 16)
    out = cipher.encrypt(0x3333333333, b"\x44" * 32)
    assert out.hex() == ("c454185e6a16936e39334038acef838b"
                         "fb186fff7480adc4289382ecd6d394f0")


def test_xts_equals_direct_cryptography_per_sector():
    key = os.urandom(64)
    data = os.urandom(3 * 512)
    out = SectorCipher(XTS256, key).encrypt(7, data)
    for i in range(3):
        tweak = (7 + i).to_bytes(16, "little")
        direct = Cipher(algorithms.AES(key), modes.XTS(tweak)).encryptor()
        assert out[i * 512:(i + 1) * 512] == direct.update(data[i * 512:(i + 1) * 512])


@pytest.mark.parametrize("alg,klen", [("aes-128", 32), ("aes-256", 64)])
def test_ecb_built_xts_matches_openssl(alg, klen):
    from qmpd.crypto.ciphers import _EcbXts
    key = bytearray(os.urandom(klen))
    iv = os.urandom(16)
    data = os.urandom(512)
    ours = _EcbXts(key).crypt(iv, data, True)
    assert ours == Cipher(algorithms.AES(bytes(key)), modes.XTS(iv)).encryptor().update(data)
    assert _EcbXts(key).crypt(iv, ours, False) == data


def test_xts_aes_192_round_trips():
    spec = CipherSpec("aes-192", "xts", "plain64")
    cipher = SectorCipher(spec, os.urandom(48))
    data = os.urandom(1024)
    assert cipher.decrypt(3, cipher.encrypt(3, data)) == data


def test_essiv_against_independent_computation():
    spec = parse_luks_cipher("aes", "cbc-essiv:sha256", 16)
    assert spec.ivgen_cipher_alg() == "aes-256"   # dm-crypt's quirk
    key = os.urandom(16)
    data = os.urandom(2 * 512)
    out = SectorCipher(spec, key).encrypt(41, data)
    salt = hashlib.sha256(key).digest()
    for i, sector in enumerate((41, 42)):
        ivgen = Cipher(algorithms.AES(salt), modes.ECB()).encryptor()
        iv = ivgen.update(sector.to_bytes(8, "little") + bytes(8))
        direct = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
        assert out[i * 512:(i + 1) * 512] == direct.update(data[i * 512:(i + 1) * 512])


def test_essiv_with_xts_hashes_the_whole_key():
    spec = parse_luks_cipher("aes", "xts-essiv:sha256", 64)
    key = os.urandom(64)
    data = os.urandom(512)
    salt = hashlib.sha256(key).digest()
    iv = Cipher(algorithms.AES(salt), modes.ECB()).encryptor().update(
        (5).to_bytes(8, "little") + bytes(8))
    direct = Cipher(algorithms.AES(key), modes.XTS(iv)).encryptor().update(data)
    assert SectorCipher(spec, key).encrypt(5, data) == direct


def test_plain_truncates_to_32_bits_and_plain64_does_not():
    key = os.urandom(32)
    data = os.urandom(512)
    plain = SectorCipher(CipherSpec("aes-256", "cbc", "plain"), key)
    plain64 = SectorCipher(CipherSpec("aes-256", "cbc", "plain64"), key)
    assert plain.encrypt((1 << 32) + 5, data) == plain.encrypt(5, data)
    assert plain64.encrypt((1 << 32) + 5, data) != plain64.encrypt(5, data)
    assert plain64.encrypt(5, data) == plain.encrypt(5, data)
    iv = (5).to_bytes(8, "little") + bytes(8)
    direct = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor().update(data)
    assert plain64.encrypt(5, data) == direct


def test_ctr_restarts_per_sector():
    key = os.urandom(16)
    data = os.urandom(1024)
    out = SectorCipher(CipherSpec("aes-128", "ctr", "plain64"), key).encrypt(9, data)
    iv = (10).to_bytes(8, "little") + bytes(8)
    direct = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor().update(data[512:])
    assert out[512:] == direct


def test_ecb_ignores_sector_numbers():
    key = os.urandom(32)
    cipher = SectorCipher(parse_luks_cipher("aes", "ecb", 32), key)
    data = os.urandom(512)
    assert cipher.encrypt(1, data) == cipher.encrypt(99, data)
    assert cipher.encrypt(1, data) == Cipher(
        algorithms.AES(key), modes.ECB()).encryptor().update(data)


def test_runs_equal_sector_by_sector():
    cipher = SectorCipher(XTS256, os.urandom(64))
    data = os.urandom(3 * 512)
    whole = cipher.encrypt(100, data)
    parts = b"".join(cipher.encrypt(100 + i, data[i * 512:(i + 1) * 512]) for i in range(3))
    assert whole == parts


def test_partial_final_sector_as_for_24_byte_key_material():
    # aes-192-cbc key material is 96000 bytes: 187 sectors and 256 bytes.
    cipher = SectorCipher(CipherSpec("aes-192", "cbc", "plain64"), os.urandom(24))
    data = os.urandom(2 * 512 + 256)
    out = cipher.encrypt(0, data)
    assert out[:1024] == cipher.encrypt(0, data[:1024])
    assert cipher.decrypt(0, out) == data


SPECS = [
    CipherSpec("aes-256", "xts", "plain64"),
    CipherSpec("aes-128", "xts", "plain"),
    CipherSpec("aes-256", "cbc", "essiv", "sha256"),
    CipherSpec("aes-128", "cbc", "essiv", "md5"),
    CipherSpec("aes-192", "cbc", "plain64"),
    CipherSpec("aes-256", "ctr", "plain64"),
    CipherSpec("aes-128", "ecb", None),
    CipherSpec("cast5-128", "cbc", "plain64"),
    CipherSpec("cast5-128", "cbc", "essiv", "md5"),
]


@settings(max_examples=60, deadline=None)
@given(spec=st.sampled_from(SPECS), data=st.data(),
       sector=st.integers(min_value=0, max_value=(1 << 64) - 8))
def test_round_trip(spec, data, sector):
    if not spec_supported(spec):
        return
    key = data.draw(st.binary(min_size=spec.key_length(), max_size=spec.key_length()))
    blocks = data.draw(st.integers(min_value=0, max_value=80))
    plaintext = data.draw(st.binary(min_size=blocks * spec.block_size(),
                                    max_size=blocks * spec.block_size()))
    cipher = SectorCipher(spec, key)
    out = cipher.encrypt(sector, plaintext)
    assert len(out) == len(plaintext)
    assert cipher.decrypt(sector, out) == plaintext


# --- LUKS header strings -----------------------------------------------------

@pytest.mark.parametrize("name,mode,nbytes,expected", [
    ("aes", "xts-plain64", 64, CipherSpec("aes-256", "xts", "plain64")),
    ("aes", "xts-plain64", 32, CipherSpec("aes-128", "xts", "plain64")),
    ("aes", "cbc-essiv:sha256", 32, CipherSpec("aes-256", "cbc", "essiv", "sha256")),
    ("aes", "cbc-essiv:sha256", 16, CipherSpec("aes-128", "cbc", "essiv", "sha256")),
    ("aes", "cbc-plain", 24, CipherSpec("aes-192", "cbc", "plain")),
    ("aes", "cbc-plain64:sha1", 32, CipherSpec("aes-256", "cbc", "plain64", "sha1")),
    ("aes", "ecb", 32, CipherSpec("aes-256", "ecb", None)),
    ("aes", "ecb-plain64", 16, CipherSpec("aes-128", "ecb", "plain64")),
])
def test_parse_and_format_round_trip(name, mode, nbytes, expected):
    spec = parse_luks_cipher(name, mode, nbytes)
    assert spec == expected
    assert spec.key_length() == nbytes
    assert format_luks_cipher(spec) == (name, mode)


def test_cast5_parses_when_openssl_has_it():
    spec = CipherSpec("cast5-128", "cbc", "plain64")
    if spec_supported(spec):
        assert parse_luks_cipher("cast5", "cbc-plain64", 16) == spec
    else:
        with pytest.raises(CryptoError):
            parse_luks_cipher("cast5", "cbc-plain64", 16)


@pytest.mark.parametrize("name,mode,nbytes,text", [
    ("aes", "cbc", 32, "Unexpected cipher mode string format 'cbc'"),
    ("aes", "xts", 64, "Unexpected cipher mode string format 'xts'"),
    ("aes", "cbc-essiv:md4", 32, "Hash algorithm 'md4' not supported"),
    ("aes", "gcm-plain64", 32, "Cipher mode 'gcm' not supported"),
    ("aes", "xts-plain64", 48, None),   # XTS-AES-192 is fine
    ("aes", "cbc-plain64", 20, "Algorithm 'aes' with key size 20 bytes not supported"),
    ("aes", "xts-plain64", 40, "Algorithm 'aes' with key size 20 bytes not supported"),
    ("des3_ede", "cbc-plain", 24, "Algorithm 'des3_ede' with key size 24 bytes not supported"),
    ("des", "cbc-plain", 8, "Algorithm 'des' with key size 8 bytes not supported"),
    ("cast5", "cbc-plain", 32, "Algorithm 'cast5' with key size 32 bytes not supported"),
    ("aes", "cbc-lmk", 32, "IV generator 'lmk' not supported"),
    ("aes", "cbc-", 32, "IV generator '' not supported"),
    ("aes", "cbc-essiv", 32, "Missing IV generator hash specification"),
    ("aes", "cbc-essiv:sha1", 32, "No AES cipher with key size 20 available"),
    ("aes", "cbc-essiv:sha512", 32, "No AES cipher with key size 64 available"),
    ("cast5", "cbc-essiv:sha256", 16, "Cipher cast5-128 not supported with essiv"),
])
def test_parse_errors_use_qemus_texts(name, mode, nbytes, text):
    if text is None:
        parse_luks_cipher(name, mode, nbytes)
        return
    with pytest.raises(CryptoError) as info:
        parse_luks_cipher(name, mode, nbytes)
    assert str(info.value) == text


@pytest.mark.parametrize("name,nbytes", [("serpent", 64), ("twofish", 32), ("serpent", 16)])
def test_serpent_and_twofish_are_not_supported(name, nbytes):
    with pytest.raises(CryptoError, match="not supported"):
        parse_luks_cipher(name, "xts-plain64" if nbytes != 16 else "cbc-plain64", nbytes)


def test_format_rejects_names_luks_cannot_carry():
    with pytest.raises(CryptoError, match="Algorithm '3des' not supported"):
        format_luks_cipher(CipherSpec("3des", "cbc", "plain64"))


def test_check_supported():
    check_cipher_supported(XTS256)
    with pytest.raises(CryptoError, match="XTS mode not compatible with DES/3DES"):
        check_cipher_supported(CipherSpec("3des", "xts", "plain64"))
    with pytest.raises(CryptoError, match="Twofish"):
        check_cipher_supported(CipherSpec("twofish-256", "cbc", "plain64"))


def test_spec_validation():
    with pytest.raises(CryptoError):
        CipherSpec("rot13", "cbc", "plain64")
    with pytest.raises(CryptoError, match="needs an IV generator"):
        CipherSpec("aes-256", "cbc", None)
    with pytest.raises(CryptoError, match="Missing IV generator hash"):
        CipherSpec("aes-256", "cbc", "essiv")
    assert CipherSpec("aes-128", "xts", "plain64").key_length() == 32
    assert CipherSpec("cast5-128", "cbc", "plain64").key_length() == 16
    assert CipherSpec("aes-128", "ecb", None).iv_length() == 0


# --- keys and lengths ----------------------------------------------------------

@pytest.mark.parametrize("spec,nkey,text", [
    (XTS256, 63, "XTS cipher key length should be a multiple of 2"),
    (XTS256, 32, "Cipher key length 32 should be 64"),
    (CipherSpec("aes-256", "cbc", "plain64"), 16, "Cipher key length 16 should be 32"),
])
def test_key_length_errors_use_qemus_texts(spec, nkey, text):
    with pytest.raises(CryptoError) as info:
        SectorCipher(spec, bytes(range(nkey)))
    assert str(info.value) == text


def test_length_must_be_whole_blocks():
    cipher = SectorCipher(XTS256, os.urandom(64))
    with pytest.raises(CryptoError) as info:
        cipher.encrypt(0, b"x" * 100)
    assert str(info.value) == "Length 100 must be a multiple of block size 16"
    assert cipher.encrypt(0, b"") == b""


def test_wipe_forgets_the_key():
    key = bytearray(os.urandom(16))
    spec = CipherSpec("aes-128", "cbc", "essiv", "sha256")
    cipher = SectorCipher(spec, key)
    data = cipher.encrypt(0, bytes(512))
    cipher.wipe()
    assert cipher._key == bytes(16) and cipher._essiv_key == bytes(32)
    with pytest.raises(CryptoError, match="wiped"):
        cipher.decrypt(0, data)
    assert key != bytes(16)   # the caller's buffer is the caller's


def test_repr_shows_no_key():
    key = bytes.fromhex("00112233445566778899aabbccddeeff") * 4
    cipher = SectorCipher(XTS256, key)
    assert "0011223344" not in repr(cipher)
    assert "aes-256" in repr(cipher)
