"""LUKS2 create: cryptsetup's layout and defaults, and cryptsetup reads what we make.

The data path is proven without dm-crypt: data encrypted with our volume's
cipher under a detached header is decrypted by ``cryptsetup reencrypt
--decrypt`` (userspace, offline) back to the plaintext.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from qmpd.crypto import argon2_calibration
from qmpd.crypto.errors import CryptoError
from qmpd.crypto.luks import (
    Luks2CreateOptions,
    MemoryImageIO,
    create_luks2_volume,
    luks2_header_length,
    open_luks2_volume,
)
from qmpd.crypto.luks.luks2_amend import choose_kdf
from qmpd.crypto.luks.luks2_header import read_luks2
from tests.crypto.luks.test_luks2_amend import fixed_costs
from tests.oracles import cryptsetup_unlocks, cryptsetup_volume_key, require, run

MiB = 1024 * 1024
PW = b"create passphrase \xc3\xa9"


def cryptsetup(*args) -> str:
    return run([require("cryptsetup"), *map(str, args)]).stdout.decode()


def test_layout():
    assert luks2_header_length(Luks2CreateOptions()) == 16 * MiB
    assert luks2_header_length(Luks2CreateOptions(detached_header=True)) == 16 * MiB
    assert luks2_header_length(Luks2CreateOptions(keyslots_size=MiB)) == 2 * MiB
    assert luks2_header_length(Luks2CreateOptions(keyslots_size=MiB,
                                                  detached_header=True)) == MiB + 32768
    with pytest.raises(CryptoError, match="multiple of 4096"):
        luks2_header_length(Luks2CreateOptions(keyslots_size=5000))


def test_create_in_memory():
    io = MemoryImageIO()
    options = Luks2CreateOptions(cipher_alg="aes-128", iter_time=1, pbkdf="pbkdf2",
                                 sector_size=4096, label="disk", keyslots_size=MiB)
    volume = create_luks2_volume(io, PW, options, digest_iter_time=0)
    assert len(io.data) == luks2_header_length(options) == 2 * MiB
    header = read_luks2(io.read)
    assert (header.seqid, header.label, header.hdr_size, header.config.keyslots_size) == (
        1, "disk", 16384, MiB)
    segment = header.segments[0]
    assert (segment.offset, segment.size, segment.sector_size, segment.encryption) == (
        2 * MiB, None, 4096, "aes-xts-plain64")
    assert header.keyslots[0].area.offset == 32768 and header.keyslots[0].key_size == 32
    assert header.digests[0].iterations == 1000 and len(header.digests[0].digest) == 32
    assert volume.payload_offset == 2 * MiB and volume.sector_size == 4096
    with open_luks2_volume(io, PW) as again:
        assert again.volume_key == volume.volume_key
    with pytest.raises(CryptoError, match="Invalid password"):
        open_luks2_volume(io, b"wrong")


@pytest.mark.parametrize("options,text", [
    (Luks2CreateOptions(sector_size=1024), "Unsupported encryption sector size 1024"),
    (Luks2CreateOptions(label="x" * 48), "Label is too long"),
    (Luks2CreateOptions(cipher_alg="aes-999"), "Cipher algorithm 'aes-999' not supported"),
    (Luks2CreateOptions(pbkdf="pbkdf2", pbkdf_parallel=2), "must not be set with pbkdf2"),
    (Luks2CreateOptions(iter_time=0), "iter-time must be a positive"),
])
def test_refused_options_write_nothing(options, text):
    io = MemoryImageIO(b"keep")
    with pytest.raises(CryptoError, match=text):
        create_luks2_volume(io, PW, options, argon2_costs=fixed_costs)
    assert bytes(io.data) == b"keep"


def test_default_kdf_is_cryptsetups():
    calls = []

    def costs(kind, iter_time, memory, parallel):
        calls.append((kind, iter_time, memory, parallel))
        return 4, memory
    kdf = choose_kdf(None, None, None, None, "sha256", 64, argon2_costs=costs)
    expected = ("argon2id", 2000, min(1024 * 1024, argon2_calibration.adjusted_physical_memory_kib()),
                min(4, argon2_calibration.online_cpus()))
    assert calls == [expected]
    assert kdf == {"type": "argon2id", "time": 4, "memory": expected[2], "cpus": expected[3]}
    # cryptsetup caps given values by the machine, too
    kdf = choose_kdf("argon2i", 10, 4 * 1024 * 1024, 4, "sha256", 64, argon2_costs=costs,
                     memory_cap_kib=1000, cpus=2)
    assert (kdf["memory"], kdf["cpus"]) == (1000, 2)


CASES = {
    "argon2id-4096-label": (dict(pbkdf="argon2id", pbkdf_memory=64, pbkdf_parallel=2,
                                 sector_size=4096, label="qmpd label"),
                            ["PBKDF:      argon2id", "Time cost:  4", "Memory:     32",
                             "Threads:    2", "sector: 4096 [bytes]",
                             "Label:         \tqmpd label"]),
    "pbkdf2-512-aes128-sha512": (dict(pbkdf="pbkdf2", cipher_alg="aes-128", hash_alg="sha512"),
                                 ["PBKDF:      pbkdf2", "Hash:       sha512",
                                  "sector: 512 [bytes]", "Cipher key: 256 bits",
                                  "Label:         \t(no label)"]),
    "argon2i-cbc-essiv": (dict(pbkdf="argon2i", pbkdf_memory=32, pbkdf_parallel=1,
                               cipher_mode="cbc", ivgen_alg="essiv"),
                          ["PBKDF:      argon2i", "cipher: aes-cbc-essiv:sha256"]),
}


@pytest.mark.interop
@pytest.mark.parametrize("name", sorted(CASES))
def test_cryptsetup_reads_what_we_create(tmp_path: Path, name: str):
    fields, expected_lines = CASES[name]
    options = Luks2CreateOptions(iter_time=1, **fields)
    io = MemoryImageIO()
    volume = create_luks2_volume(io, PW, options, argon2_costs=fixed_costs, digest_iter_time=0)
    path = tmp_path / "img"
    path.write_bytes(bytes(io.data) + bytes(MiB))
    cryptsetup("isLuks", "--type", "luks2", path)
    dump = cryptsetup("luksDump", path)
    for line in expected_lines + ["Epoch:         \t1", "Area offset:32768 [bytes]",
                                  "offset: 16777216 [bytes]"]:
        assert line in dump, line
    assert f"UUID:          \t{volume.header.uuid}" in dump
    assert cryptsetup_unlocks(str(path), PW) and not cryptsetup_unlocks(str(path), b"no")
    assert cryptsetup_volume_key(str(path), PW) == bytes(volume.volume_key)
    meta = json.loads(cryptsetup("luksDump", "--dump-json-metadata", path))
    assert meta == volume.header.metadata


def known_plaintext(size: int) -> bytes:
    return b"".join(struct.pack("<Q", i) * 64 for i in range(size // 512))


@pytest.mark.interop
@pytest.mark.parametrize("sector_size", [512, 4096])
def test_cryptsetup_decrypts_our_data(tmp_path: Path, sector_size: int):
    """Detached header: data at 0 of its own file, encrypted by our cipher."""
    options = Luks2CreateOptions(iter_time=1, pbkdf="pbkdf2", sector_size=sector_size,
                                 detached_header=True)
    io = MemoryImageIO()
    volume = create_luks2_volume(io, PW, options, digest_iter_time=0)
    assert volume.payload_offset == 0 and len(io.data) == luks2_header_length(options)
    header_path, data_path, key = tmp_path / "hdr", tmp_path / "data", tmp_path / "key"
    header_path.write_bytes(bytes(io.data))
    key.write_bytes(PW)
    plaintext = known_plaintext(256 * 1024)
    ciphertext = volume.cipher.encrypt(0, plaintext)
    assert ciphertext != plaintext
    data_path.write_bytes(ciphertext)
    cryptsetup("reencrypt", "--decrypt", "--batch-mode", "--force-offline-reencrypt",
               "--header", header_path, "--key-file", key, data_path)
    assert data_path.read_bytes() == plaintext
