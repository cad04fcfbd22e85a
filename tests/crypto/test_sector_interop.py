"""Our sector ciphers, PBKDF2 and AF splitter against qemu-img/qemu-io/cryptsetup.

Images are made by the reference tools; the tests decrypt what QEMU wrote
(payload and key material) with qmpd's primitives, and write ciphertext of
ours that QEMU must read back.
"""

import struct
import subprocess

import pytest

from qmpd.crypto.afsplit import af_merge
from qmpd.crypto.ciphers import SectorCipher, parse_luks_cipher
from qmpd.crypto.pbkdf import pbkdf2
from tests.oracles import cryptsetup_volume_key, qemu_img_create_luks, require, run

pytestmark = pytest.mark.interop

PASSPHRASE = "qmpd-interop-pw"
LENGTH = 64 * 1024
OUR_OFFSET = 2 * LENGTH + 512 * 7   # away from what qemu-io writes at 0


def read_header(path):
    """The LUKS1 fields these tests need (cryptsetup's on-disk spec)."""
    with open(path, "rb") as f:
        raw = f.read(592)
    assert raw[:6] == b"LUKS\xba\xbe"
    text = lambda b: b.split(b"\0", 1)[0].decode()
    payload_offset, key_bytes = struct.unpack(">II", raw[104:112])
    slots = []
    for i in range(8):
        active, iterations, salt, key_offset, stripes = struct.unpack(
            ">II32sII", raw[208 + 48 * i:256 + 48 * i])
        slots.append(dict(active=active, iterations=iterations, salt=salt,
                          key_offset=key_offset, stripes=stripes))
    return dict(cipher_name=text(raw[8:40]), cipher_mode=text(raw[40:72]),
                hash_spec=text(raw[72:104]), payload_offset=payload_offset,
                key_bytes=key_bytes, mk_digest=raw[112:132], mk_salt=raw[132:164],
                mk_iterations=struct.unpack(">I", raw[164:168])[0], slots=slots)


def qemu_io(path, command):
    require("qemu-io")
    proc = run(["qemu-io", "--object", f"secret,id=s0,data={PASSPHRASE}",
                "--image-opts", f"driver=luks,key-secret=s0,file.filename={path}",
                "-c", command])
    return proc.stdout.decode()


def make_qemu_img_image(tmp_path, extra=""):
    path = str(tmp_path / "qemu.luks")
    qemu_img_create_luks(path, PASSPHRASE, size="4M", iter_time=10, extra=extra)
    return path


def make_cryptsetup_image(tmp_path, cipher, key_size, hash_name):
    require("cryptsetup")
    path = tmp_path / "cs.luks"
    with open(path, "wb") as f:
        f.truncate(8 * 1024 * 1024)
    run(["cryptsetup", "luksFormat", "--batch-mode", "--type", "luks1",
         "--pbkdf-force-iterations", "1000", "--cipher", cipher,
         "--key-size", str(key_size), "--hash", hash_name, "--key-file", "-",
         str(path)], input=PASSPHRASE.encode())
    return str(path)


IMAGES = [
    pytest.param("", id="qemu-img-default-aes-256-xts-plain64"),
    # dm-crypt's ESSIV quirk: aes-128 data cipher, AES-256 for the IVs
    pytest.param("cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,hash-alg=sha1",
                 id="qemu-img-aes-128-cbc-essiv-sha256-sha1"),
    pytest.param("cipher-alg=aes-128,cipher-mode=ctr,ivgen-alg=plain",
                 id="qemu-img-aes-128-ctr-plain"),
    pytest.param(("aes-cbc-essiv:sha256", 256, "sha256"), id="cryptsetup-aes-cbc-essiv"),
    pytest.param(("aes-xts-plain64", 256, "sha1"), id="cryptsetup-aes-128-xts-sha1"),
    pytest.param(("aes-cbc-plain64", 256, "sha512"), id="cryptsetup-aes-256-cbc-plain64-sha512"),
]


@pytest.fixture(scope="module", params=IMAGES)
def image(request, tmp_path_factory):
    """One image per variant for the module: the tests write disjoint ranges."""
    tmp_path = tmp_path_factory.mktemp("luks")
    if isinstance(request.param, str):
        return make_qemu_img_image(tmp_path, request.param)
    return make_cryptsetup_image(tmp_path, *request.param)


def payload_cipher(path):
    header = read_header(path)
    spec = parse_luks_cipher(header["cipher_name"], header["cipher_mode"],
                             header["key_bytes"])
    key = cryptsetup_volume_key(path, PASSPHRASE.encode())
    assert len(key) == spec.key_length()
    return header, SectorCipher(spec, key)


def test_decrypts_what_qemu_wrote(image):
    qemu_io(image, f"write -P 0x5a 0 {LENGTH}")
    header, cipher = payload_cipher(image)
    with open(image, "rb") as f:
        f.seek(header["payload_offset"] * 512)
        ciphertext = f.read(LENGTH)
    assert ciphertext != b"\x5a" * LENGTH
    assert cipher.decrypt(0, ciphertext) == b"\x5a" * LENGTH


def test_qemu_reads_what_we_encrypted(image):
    header, cipher = payload_cipher(image)
    plaintext = bytes([0x3c]) * LENGTH
    with open(image, "r+b") as f:
        f.seek(header["payload_offset"] * 512 + OUR_OFFSET)
        f.write(cipher.encrypt(OUR_OFFSET // 512, plaintext))
    out = qemu_io(image, f"read -P 0x3c {OUR_OFFSET} {LENGTH}")
    assert "Pattern verification failed" not in out
    assert f"read {LENGTH}/{LENGTH} bytes" in out


def test_unlocks_the_key_slot_like_qemu(image):
    """PBKDF2 + slot decryption (sector 0 upwards) + AF merge = volume key."""
    check_key_slot(image)


def test_unlocks_a_24_byte_key_slot(tmp_path):
    """aes-192: 96000 bytes of key material end mid-sector.

    cryptsetup encrypts the short last sector as it is; QEMU 7.2's qemu-io
    aborts on such images (block.c: Assertion `QEMU_IS_ALIGNED(len,
    sectorsize)'), so only cryptsetup is the oracle here.
    """
    check_key_slot(make_cryptsetup_image(tmp_path, "aes-cbc-plain64", 192, "sha512"))


def check_key_slot(image):
    header = read_header(image)
    spec = parse_luks_cipher(header["cipher_name"], header["cipher_mode"],
                             header["key_bytes"])
    slot = header["slots"][0]
    assert slot["active"] == 0x00AC71F3
    nkey = header["key_bytes"]
    slot_key = pbkdf2(header["hash_spec"], PASSPHRASE.encode(), slot["salt"],
                      slot["iterations"], nkey)
    with open(image, "rb") as f:
        f.seek(slot["key_offset"] * 512)
        material = f.read(nkey * slot["stripes"])
    split = SectorCipher(spec, slot_key).decrypt(0, material)
    volume_key = af_merge(header["hash_spec"], split, nkey, slot["stripes"])
    assert bytes(volume_key) == cryptsetup_volume_key(image, PASSPHRASE.encode())
    digest = pbkdf2(header["hash_spec"], volume_key, header["mk_salt"],
                    header["mk_iterations"], 20)
    assert bytes(digest) == header["mk_digest"]
