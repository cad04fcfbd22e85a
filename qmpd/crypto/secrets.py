"""Secret objects: QEMU's ``secret`` QOM type.

A secret's value is the passphrase bytes other objects refer to by id
(``key-secret``, ``new-secret`` ...). It is decoded once, when added:
``format=base64`` decodes like GLib (which QEMU uses), ``keyid`` + ``iv``
decrypt AES-256-CBC data under another secret, exactly as QEMU does.

Values live in bytearrays owned by the store; :meth:`SecretStore.lookup`
hands out a copy the caller wipes. Nothing here puts a value in a repr, a
log line or an error text.
"""

from __future__ import annotations

import os
import re

from qmpd.crypto.errors import CryptoError

_BASE64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_BASE64_RANK = {c: i for i, c in enumerate(_BASE64_ALPHABET)}
_BASE64_RANK[ord("=")] = 0
_BASE64_VALID = re.compile(rb"\A[A-Za-z0-9+/=\n]*\Z")

#: QEMU's id_wellformed(): a letter, then letters, digits, '-', '.', '_'.
_ID_RE = re.compile(r"\A[A-Za-z][A-Za-z0-9._-]*\Z")


def id_wellformed(name: str) -> bool:
    return bool(_ID_RE.match(name))


def wipe(buf: bytearray | None) -> None:
    """Overwrite a buffer we own (Python cannot reach copies made elsewhere)."""
    if buf is not None:
        buf[:] = bytes(len(buf))


def base64_decode(text: bytes) -> bytearray:
    """QEMU's qbase64_decode(): strict alphabet check, then GLib's decoder.

    GLib counts '=' as a zero digit and drops an incomplete last group, so
    QEMU accepts "eA" (and yields nothing for it); we must do the same.
    """
    if b"\0" in text:
        raise CryptoError("Base64 data contains embedded NUL characters")
    if not _BASE64_VALID.match(text):
        raise CryptoError("Base64 data contains invalid characters")
    out = bytearray()
    value = 0
    count = 0
    last = [0, 0]
    for c in text:
        rank = _BASE64_RANK.get(c)
        if rank is None:
            continue
        last[1], last[0] = last[0], c
        value = (value << 6) | rank
        count += 1
        if count == 4:
            out.append((value >> 16) & 0xFF)
            if last[1] != ord("="):
                out.append((value >> 8) & 0xFF)
            if last[0] != ord("="):
                out.append(value & 0xFF)
            value = 0
            count = 0
    return out


class Secret:
    """One secret object; its value is never shown."""

    __slots__ = ("id", "_value")

    def __init__(self, secret_id: str, value: bytearray) -> None:
        self.id = secret_id
        self._value = value

    def value_copy(self) -> bytearray:
        return bytearray(self._value)

    def wipe(self) -> None:
        wipe(self._value)

    def __repr__(self) -> str:
        return f"Secret(id={self.id!r}, value=<hidden>)"


class SecretStore:
    """The daemon's secret objects by id."""

    def __init__(self) -> None:
        self._secrets: dict[str, Secret] = {}

    def __contains__(self, secret_id: str) -> bool:
        return secret_id in self._secrets

    def ids(self) -> list[str]:
        return list(self._secrets)

    def lookup(self, secret_id: str) -> bytearray:
        """A copy of the secret's value; the caller wipes it when done."""
        secret = self._secrets.get(secret_id)
        if secret is None:
            raise CryptoError(f"No secret with id '{secret_id}'")
        return secret.value_copy()

    def add(
        self,
        secret_id: str,
        *,
        data: str | None = None,
        file: str | None = None,
        format: str = "raw",
        keyid: str | None = None,
        iv: str | None = None,
        file_contents: bytearray | None = None,
    ) -> None:
        """Decode and store a secret as QEMU's object-add does (same checks, same texts).

        The caller has already checked that the id is free among all objects.
        """
        value = self._load(
            data=data, file=file, format=format, keyid=keyid, iv=iv, file_contents=file_contents
        )
        self._secrets[secret_id] = Secret(secret_id, value)

    def delete(self, secret_id: str) -> None:
        secret = self._secrets.pop(secret_id)
        secret.wipe()

    def clear(self) -> None:
        for secret in self._secrets.values():
            secret.wipe()
        self._secrets.clear()

    def _load(self, *, data, file, format, keyid, iv, file_contents) -> bytearray:
        if data is not None and file is not None:
            raise CryptoError("'file' and 'data' are mutually exclusive")
        if data is not None:
            raw = bytearray(data.encode("utf-8", "surrogatepass"))
        elif file is not None:
            raw = bytearray(file_contents) if file_contents is not None else read_secret_file(file)
        else:
            raise CryptoError("Either 'file' or 'data' must be provided")
        try:
            if keyid is not None:
                return self._decrypt(raw, format, keyid, iv)
            if format == "base64":
                return base64_decode(bytes(raw))
            return bytearray(raw)
        finally:
            wipe(raw)

    def _decrypt(self, raw: bytearray, format: str, keyid: str, iv: str | None) -> bytearray:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        key = self.lookup(keyid)
        try:
            if len(key) != 32:
                raise CryptoError("Key should be 32 bytes in length")
            if iv is None:
                raise CryptoError("IV is required to decrypt secret")
            iv_bytes = base64_decode(iv.encode())
            if len(iv_bytes) != 16:
                raise CryptoError(f"IV should be 16 bytes in length not {len(iv_bytes)}")
            ciphertext = base64_decode(bytes(raw)) if format == "base64" else bytearray(raw)
            if len(ciphertext) % 16:
                raise CryptoError(f"Length {len(ciphertext)} must be a multiple of block size 16")
            decryptor = Cipher(algorithms.AES(bytes(key)), modes.CBC(bytes(iv_bytes))).decryptor()
            plaintext = bytearray(decryptor.update(bytes(ciphertext)) + decryptor.finalize())
            wipe(ciphertext)
            pad = plaintext[-1] if plaintext else 0
            if not plaintext or pad > 16 or pad > len(plaintext):
                wipe(plaintext)
                raise CryptoError(
                    f"Incorrect number of padding bytes ({pad}) found on decrypted data"
                )
            value = bytearray(plaintext[: len(plaintext) - pad])
            wipe(plaintext)
            return value
        finally:
            wipe(key)


def read_secret_file(path: str) -> bytearray:
    """The contents of a secret file, with QEMU's (GLib's) error texts."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        assert exc.errno is not None  # a failed system call sets it
        raise CryptoError(
            f"Unable to read {path}: Failed to open file \u201c{path}\u201d: "
            f"{os.strerror(exc.errno)}"
        ) from None
    try:
        buf = bytearray()
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return buf
            buf += chunk
    except OSError as exc:
        assert exc.errno is not None  # a failed system call sets it
        raise CryptoError(
            f"Unable to read {path}: Error reading file \u201c{path}\u201d: "
            f"{os.strerror(exc.errno)}"
        ) from None
    finally:
        os.close(fd)
