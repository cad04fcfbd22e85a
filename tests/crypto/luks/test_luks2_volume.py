"""open_volume on a LUKS2 image: opened only when asked (raw LUKS), refused as
QEMU refuses it otherwise (qcow2's LUKS inside is LUKS1 only)."""

from __future__ import annotations

import pytest

from qmpd.crypto.errors import CryptoError
from qmpd.crypto.luks import Luks2Volume, LuksVolume, MemoryImageIO, open_volume
from qmpd.crypto.luks.luks2_volume import probe_version
from tests.oracles import require, run

MiB = 1 << 20


@pytest.fixture(scope="module")
def luks2_image(tmp_path_factory) -> bytes:
    require("cryptsetup")
    d = tmp_path_factory.mktemp("l2v")
    image, key = d / "img", d / "key"
    key.write_bytes(b"pw")
    with open(image, "wb") as f:
        f.truncate(20 * MiB)
    run(["cryptsetup", "luksFormat", "--type", "luks2", "--batch-mode", "--key-file", str(key),
         "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--sector-size", "4096",
         str(image)])
    return image.read_bytes()


def test_probe_version(luks2_image):
    assert probe_version(luks2_image[:8]) == 2
    assert probe_version(b"LUKS\xba\xbe\x00\x01") == 1
    assert probe_version(b"QFI\xfb\x00\x00\x00\x03") is None
    assert probe_version(b"LUKS") is None


def test_luks2_needs_asking(luks2_image):
    io = MemoryImageIO(luks2_image)
    with pytest.raises(CryptoError, match="^LUKS version 2 is not supported$"):
        open_volume(io, b"pw")
    with open_volume(io, b"pw", payload_in_file=False, luks2=True) as volume:   # qcow2's
        assert isinstance(volume, Luks2Volume) and volume.detached_header
    with open_volume(io, b"pw", luks2=True) as volume:
        assert isinstance(volume, Luks2Volume) and not isinstance(volume, LuksVolume)
        assert (volume.version, volume.sector_size, volume.payload_size) == (2, 4096, None)
        assert volume.cipher.sector_size == 4096
        assert volume.payload_offset == 16 * MiB
        assert volume.witness is None
        key = bytes(volume.volume_key)
    assert key and volume.cipher._wiped
    with pytest.raises(CryptoError, match="closed"):
        _ = volume.volume_key


def test_wrong_passphrase(luks2_image):
    with pytest.raises(CryptoError, match="^Invalid password, cannot unlock any keyslot$"):
        open_volume(MemoryImageIO(luks2_image), b"nope", luks2=True)


def test_payload_beyond_the_end(luks2_image):
    io = MemoryImageIO(luks2_image[:16 * MiB - 4096])
    with pytest.raises(CryptoError, match="beyond the end of the image"):
        open_volume(io, b"pw", luks2=True)
