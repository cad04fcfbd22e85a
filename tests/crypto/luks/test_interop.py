"""Both directions against qemu-img, qemu-io and cryptsetup."""

from __future__ import annotations

import json
import os

import pytest

from qmpd.crypto.errors import CryptoError
from qmpd.posixio import FileImageIO
from qmpd.crypto.luks import (
    LuksAmendOptions, LuksCreateOptions, apply_amend, create_volume, open_volume,
    prepare_amend)
from tests import oracles

pytestmark = pytest.mark.interop
PW = b"correct horse"


def _qemu_img_info(path, passphrase: bytes) -> dict:
    proc = oracles.run_qemu_img([
        "info", "--output=json", "--object", f"secret,id=s0,data={passphrase.decode()}",
        "--image-opts", f"driver=luks,key-secret=s0,file.filename={path}"])
    return json.loads(proc.stdout)


def _qemu_unlocks(path, passphrase: bytes) -> bool:
    """True if QEMU opens the image with the passphrase.

    qemu-io, not qemu-img info: info opens without I/O and never checks the
    passphrase.
    """
    oracles.require("qemu-io")
    proc = oracles.run(["qemu-io", "--object",
                        f"secret,id=s0,data={passphrase.decode()}", "--image-opts",
                        f"driver=luks,key-secret=s0,file.filename={path}",
                        "-c", "read 0 512"], check=False)
    if proc.returncode == 0:
        return True
    assert b"Invalid password, cannot unlock any keyslot" in proc.stderr, proc.stderr
    return False


def _cryptsetup_format(path, cipher: str, key_size: int, hash_name: str) -> None:
    oracles.require("cryptsetup")
    with open(path, "wb") as f:
        f.truncate(4 * 1024 * 1024)
    oracles.run(["cryptsetup", "luksFormat", "--batch-mode", "--type", "luks1",
                 "--pbkdf-force-iterations", "1000", "--cipher", cipher, "--key-size",
                 str(key_size), "--hash", hash_name, "--key-file", "-", str(path)], input=PW)


def _luks_dump(path) -> dict:
    proc = oracles.run(["cryptsetup", "luksDump", str(path)])
    fields = {}
    for line in proc.stdout.decode().splitlines():
        if ":" in line and not line.startswith(("\t", " ")):
            key, value = line.split(":", 1)
            fields[key.strip()] = value.strip()
    return fields


@pytest.fixture
def qemu_image(tmp_path):
    path = tmp_path / "qemu.img"
    oracles.qemu_img_create_luks(str(path), PW.decode(), size="4M", iter_time=10)
    return path


def test_qemu_img_image_opens_with_the_same_key_and_info(qemu_image):
    with FileImageIO(qemu_image, readonly=True) as io:
        volume = open_volume(io, PW)
        assert bytes(volume.volume_key) == oracles.cryptsetup_volume_key(str(qemu_image), PW)
        info = _qemu_img_info(qemu_image, PW)["format-specific"]["data"]
        assert volume.info() == info
        with pytest.raises(CryptoError, match="Invalid password"):
            open_volume(io, b"wrong")


@pytest.mark.parametrize("cipher, key_size, hash_name", [
    ("aes-xts-plain64", 256, "sha256"),
    ("aes-xts-plain64", 512, "sha1"),
    ("aes-xts-plain64", 512, "sha512"),
    ("aes-cbc-essiv:sha256", 256, "sha256"),
    ("aes-cbc-essiv:sha256", 128, "sha1"),
    ("aes-cbc-plain", 256, "sha512"),
])
def test_cryptsetup_images_open_here(tmp_path, cipher, key_size, hash_name):
    path = tmp_path / "cs.img"
    _cryptsetup_format(path, cipher, key_size, hash_name)
    with FileImageIO(path, readonly=True) as io:
        volume = open_volume(io, PW)
        assert bytes(volume.volume_key) == oracles.cryptsetup_volume_key(str(path), PW)
        assert volume.info() == _qemu_img_info(path, PW)["format-specific"]["data"]


@pytest.mark.parametrize("source", ["qemu-img", "cryptsetup"])
def test_keys_added_and_erased_here_are_seen_by_both(tmp_path, source):
    path = tmp_path / "img"
    if source == "qemu-img":
        oracles.qemu_img_create_luks(str(path), PW.decode(), size="1M", iter_time=10)
    else:
        _cryptsetup_format(path, "aes-cbc-essiv:sha256", 256, "sha256")
    volume_key = oracles.cryptsetup_volume_key(str(path), PW)
    with FileImageIO(path) as io:
        volume = open_volume(io, PW)
        for options in (
                LuksAmendOptions("active", new_secret=b"second", iter_time=10, opened_secret=PW),
                LuksAmendOptions("active", new_secret=b"third", keyslot=5, iter_time=10,
                                 secret=b"second")):
            apply_amend(prepare_amend(volume, io, options), io)
        for passphrase in (PW, b"second", b"third"):
            assert oracles.cryptsetup_unlocks(str(path), passphrase), passphrase
            assert _qemu_unlocks(path, passphrase), passphrase
            assert oracles.cryptsetup_volume_key(str(path), passphrase) == volume_key
        apply_amend(prepare_amend(volume, io, LuksAmendOptions("inactive", old_secret=PW)), io)
        apply_amend(prepare_amend(volume, io, LuksAmendOptions("inactive", keyslot=5)), io)
    assert not oracles.cryptsetup_unlocks(str(path), PW)
    assert not oracles.cryptsetup_unlocks(str(path), b"third")
    assert not _qemu_unlocks(path, PW)
    assert _qemu_unlocks(path, b"second")
    assert oracles.cryptsetup_volume_key(str(path), b"second") == volume_key
    dump = oracles.run(["cryptsetup", "luksDump", str(path)]).stdout.decode()
    assert dump.count("ENABLED") == 1


@pytest.mark.parametrize("options, dump", [
    (LuksCreateOptions(iter_time=10),
     {"Cipher name": "aes", "Cipher mode": "xts-plain64", "Hash spec": "sha256",
      "Payload offset": "4040", "MK bits": "512"}),
    (LuksCreateOptions(cipher_alg="aes-128", cipher_mode="cbc", ivgen_alg="essiv",
                       hash_alg="sha1", iter_time=10),
     {"Cipher name": "aes", "Cipher mode": "cbc-essiv:sha256", "Hash spec": "sha1",
      "Payload offset": "1032", "MK bits": "128"}),
    (LuksCreateOptions(cipher_alg="aes-192", cipher_mode="xts", hash_alg="sha512",
                       iter_time=10),
     {"Cipher name": "aes", "Cipher mode": "xts-plain64", "Hash spec": "sha512",
      "Payload offset": "3016", "MK bits": "384"}),
    (LuksCreateOptions(cipher_alg="aes-256", cipher_mode="cbc", ivgen_alg="plain",
                       iter_time=10),
     {"Cipher name": "aes", "Cipher mode": "cbc-plain", "Hash spec": "sha256",
      "Payload offset": "2056", "MK bits": "256"}),
])
def test_images_created_here_open_in_qemu_img_and_cryptsetup(tmp_path, options, dump):
    path = tmp_path / "ours.img"
    path.touch()
    with FileImageIO(path) as io:
        volume = create_volume(io, PW, options)
        os.truncate(path, volume.payload_offset + 1024 * 1024)
        info = volume.info()
    fields = _luks_dump(path)
    assert {k: fields[k] for k in dump} == dump
    assert fields["Version"] == "1" and fields["UUID"] == info["uuid"]
    assert _qemu_unlocks(path, PW) and not _qemu_unlocks(path, b"other")
    if options.cipher_alg == "aes-192" and options.cipher_mode == "xts":
        # cryptsetup's userspace crypto (kernel AF_ALG) has no XTS-AES-192
        # and there is no device-mapper here to fall back on.
        return
    assert oracles.cryptsetup_unlocks(str(path), PW)
    assert not oracles.cryptsetup_unlocks(str(path), b"other")
    assert oracles.cryptsetup_volume_key(str(path), PW) == bytes(volume.volume_key)
    qemu_info = _qemu_img_info(path, PW)
    assert qemu_info["virtual-size"] == 1024 * 1024
    assert qemu_info["format-specific"]["data"] == info


def test_payload_written_by_qemu_io_decrypts_here_and_back(qemu_image):
    oracles.require("qemu-io")
    image_opts = f"driver=luks,key-secret=s0,file.filename={qemu_image}"
    secret = f"secret,id=s0,data={PW.decode()}"
    oracles.run(["qemu-io", "--object", secret, "--image-opts", image_opts,
                 "-c", "write -P 0x5a 4096 8192"])
    with FileImageIO(qemu_image) as io:
        volume = open_volume(io, PW)
        first = 4096 // 512
        plain = volume.cipher.decrypt(first, io.read(volume.payload_offset + 4096, 8192))
        assert plain == b"\x5a" * 8192
        # And the other way: sectors this engine encrypts read back in qemu-io.
        io.write(volume.payload_offset + 65536, volume.cipher.encrypt(128, b"\xa7" * 4096))
    oracles.run(["qemu-io", "--object", secret, "--image-opts", image_opts,
                 "-c", "read -P 0xa7 65536 4096", "-c", "read -P 0x5a 4096 8192"])
