"""Secret objects: QEMU's decoding rules and texts; values never shown."""

import base64
import os

import pytest
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from qmpd.crypto.errors import CryptoError
from qmpd.crypto.secrets import SecretStore, base64_decode


def test_raw_and_base64():
    store = SecretStore()
    store.add("a", data="pässword")
    store.add("b", data=base64.b64encode(b"\x00\xffkey").decode(), format="base64")
    assert store.lookup("a") == "pässword".encode()
    assert store.lookup("b") == b"\x00\xffkey"


def test_glib_base64_quirks():
    # GLib drops an incomplete group: QEMU accepts "eA" as an empty secret.
    assert base64_decode(b"eA") == b""
    assert base64_decode(b"eA==") == b"x"
    with pytest.raises(CryptoError, match="^Base64 data contains invalid characters$"):
        base64_decode(b"!!!")


@pytest.mark.parametrize("kwargs, text", [
    ({}, "Either 'file' or 'data' must be provided"),
    ({"data": "x", "file": "/etc/hostname"}, "'file' and 'data' are mutually exclusive"),
    ({"file": "/nonexistent/pw"},
     "Unable to read /nonexistent/pw: Failed to open file \u201c/nonexistent/pw\u201d: No such file or directory"),
    ({"data": "eA==", "keyid": "nokey", "iv": "AAAAAAAAAAAAAAAAAAAAAA=="}, "No secret with id 'nokey'"),
    ({"data": "eA==", "keyid": "short"}, "Key should be 32 bytes in length"),
    ({"data": "eA==", "keyid": "key32"}, "IV is required to decrypt secret"),
    ({"data": "eA==", "keyid": "key32", "iv": "AAAA"}, "IV should be 16 bytes in length not 3"),
])
def test_qemu_error_texts(kwargs, text):
    store = SecretStore()
    store.add("short", data="x")
    store.add("key32", data=base64.b64encode(b"k" * 32).decode(), format="base64")
    with pytest.raises(CryptoError) as info:
        store.add("new", **kwargs)
    assert str(info.value) == text


def test_keyid_iv_decrypts_aes_256_cbc_like_qemu(tmp_path):
    key, iv = os.urandom(32), os.urandom(16)
    padder = padding.PKCS7(128).padder()
    plain = padder.update(b"the passphrase") + padder.finalize()
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    ciphertext = encryptor.update(plain) + encryptor.finalize()
    store = SecretStore()
    store.add("master", data=base64.b64encode(key).decode(), format="base64")
    store.add("s", data=base64.b64encode(ciphertext).decode(), format="base64",
              keyid="master", iv=base64.b64encode(iv).decode())
    assert store.lookup("s") == b"the passphrase"


def test_file_secret_and_repr_hides_value(tmp_path):
    path = tmp_path / "pw"
    path.write_bytes(b"from-a-file")
    store = SecretStore()
    store.add("f", file=str(path))
    assert store.lookup("f") == b"from-a-file"
    assert "from-a-file" not in repr(store._secrets["f"])


def test_delete_wipes_the_value():
    store = SecretStore()
    store.add("a", data="wipe-me")
    secret = store._secrets["a"]
    store.delete("a")
    assert bytes(secret._value) == bytes(len(b"wipe-me"))
    with pytest.raises(CryptoError, match="No secret with id 'a'"):
        store.lookup("a")
