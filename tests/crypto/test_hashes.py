import hashlib

import pytest
from cryptography.hazmat.primitives import hashes

from qmpd.crypto.errors import CryptoError
from qmpd.crypto.hashes import HASH_NAMES, hash_algorithm, hash_digest_size, hash_supported


def test_names_are_qemus_enum_in_order():
    assert HASH_NAMES == ("md5", "sha1", "sha224", "sha256", "sha384", "sha512",
                          "ripemd160")


@pytest.mark.parametrize("name", [n for n in HASH_NAMES if n != "ripemd160"])
def test_common_hashes_match_hashlib(name):
    digest = hashes.Hash(hash_algorithm(name))
    digest.update(b"qmpd")
    assert digest.finalize() == hashlib.new(name, b"qmpd").digest()
    assert hash_digest_size(name) == hashlib.new(name).digest_size


def test_ripemd160_known_answer_or_clear_error():
    if not hash_supported("ripemd160"):
        with pytest.raises(CryptoError, match="ripemd160.*not supported"):
            hash_algorithm("ripemd160")
        return
    digest = hashes.Hash(hash_algorithm("ripemd160"))
    digest.update(b"message digest")
    assert digest.finalize().hex() == "5d0689ef49d2fae572b881b123a85ffa21595f36"
    assert hash_digest_size("ripemd160") == 20


@pytest.mark.parametrize("name", ["md4", "SHA256", "sha3-256", "", "whirlpool"])
def test_unknown_names_use_qemus_text(name):
    with pytest.raises(CryptoError) as info:
        hash_algorithm(name)
    assert str(info.value) == f"Hash algorithm '{name}' not supported"
    with pytest.raises(CryptoError):
        hash_digest_size(name)
    assert not hash_supported(name)


def test_each_call_returns_a_fresh_object():
    assert hash_algorithm("sha256") is not hash_algorithm("sha256")
