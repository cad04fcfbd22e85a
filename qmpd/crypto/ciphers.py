"""Sector ciphers: the LUKS payload and key-material encryption.

A LUKS volume is encrypted in 512-byte sectors, each with its own IV made
by an IV generator from the sector number (QEMU crypto/ivgen-*.c,
crypto/block.c's cipher helpers, dm-crypt):

* plain   - the sector number's low 32 bits, little-endian, zero padded;
* plain64 - the sector number as 64-bit little-endian, zero padded;
* essiv   - the 64-bit little-endian sector number, zero padded to a cipher
  block and encrypted (ECB) under H(volume key).  dm-crypt's quirk, kept by
  QEMU: the ESSIV cipher is the same family as the payload cipher but with
  a key as long as the digest (aes-128 + essiv:sha256 uses AES-256).

Names are QEMU's QAPI names (cipher_alg "aes-256", cipher_mode "xts",
ivgen_alg "plain64"); the LUKS header spells them "aes" / "xts-plain64" and
parse_luks_cipher / format_luks_cipher translate, with QEMU's checks and
error texts (crypto/block-luks.c, crypto/cipher.c).

Only what `cryptography` computes is supported: AES in every mode, CAST5
and DES/3DES in ECB/CBC when the OpenSSL build offers them; Serpent and
Twofish never.  AES-XTS that OpenSSL refuses but QEMU (nettle) and the
kernel accept - XTS-AES-192, and keys whose two halves are equal - goes
through a small XTS built on AES-ECB here.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from qmpd.crypto.errors import CryptoError
from qmpd.crypto.hashes import HASH_NAMES, hash_algorithm, hash_digest_size

try:  # cryptography >= 43 keeps the old ciphers apart
    from cryptography.hazmat.decrepit.ciphers.algorithms import CAST5, TripleDES
except ImportError:  # pragma: no cover - older cryptography
    CAST5 = getattr(algorithms, "CAST5", None)
    TripleDES = getattr(algorithms, "TripleDES", None)

SECTOR_SIZE = 512

# crypto/cipher.c: alg_key_len and alg_block_len.
CIPHER_KEY_LENGTHS: dict[str, int] = {
    "aes-128": 16, "aes-192": 24, "aes-256": 32,
    "des": 8, "3des": 24, "cast5-128": 16,
    "serpent-128": 16, "serpent-192": 24, "serpent-256": 32,
    "twofish-128": 16, "twofish-192": 24, "twofish-256": 32,
}
CIPHER_BLOCK_SIZES: dict[str, int] = {
    "aes-128": 16, "aes-192": 16, "aes-256": 16,
    "des": 8, "3des": 8, "cast5-128": 8,
    "serpent-128": 16, "serpent-192": 16, "serpent-256": 16,
    "twofish-128": 16, "twofish-192": 16, "twofish-256": 16,
}
CIPHER_ALGS: tuple[str, ...] = tuple(CIPHER_KEY_LENGTHS)
CIPHER_MODES: tuple[str, ...] = ("ecb", "cbc", "xts", "ctr")
IVGEN_ALGS: tuple[str, ...] = ("plain", "plain64", "essiv")

# crypto/block-luks.c: qcrypto_block_luks_cipher_name_map (the only cipher
# names a LUKS header may carry for QEMU; no DES there).
_LUKS_CIPHER_NAMES: dict[str, dict[int, str]] = {
    "aes": {16: "aes-128", 24: "aes-192", 32: "aes-256"},
    "cast5": {16: "cast5-128"},
    "serpent": {16: "serpent-128", 24: "serpent-192", 32: "serpent-256"},
    "twofish": {16: "twofish-128", 24: "twofish-192", 32: "twofish-256"},
}
_LUKS_NAME_OF = {alg: name for name, sizes in _LUKS_CIPHER_NAMES.items()
                 for alg in sizes.values()}
_ESSIV_FAMILY_TEXT = {"aes": "AES", "serpent": "Serpent", "twofish": "Twofish"}


@dataclass(frozen=True)
class CipherSpec:
    """How sectors are encrypted: cipher, mode, IV generator (QEMU names).

    ivgen_alg is None only for bare "ecb", which needs no IV.  ivgen_hash_alg
    is kept even for plain/plain64 (QEMU and dm-crypt ignore it there) so
    the header string round-trips.
    """

    cipher_alg: str
    cipher_mode: str
    ivgen_alg: str | None = None
    ivgen_hash_alg: str | None = None

    def __post_init__(self) -> None:
        if self.cipher_alg not in CIPHER_KEY_LENGTHS:
            raise CryptoError(f"Cipher algorithm '{self.cipher_alg}' not supported")
        if self.cipher_mode not in CIPHER_MODES:
            raise CryptoError(f"Cipher mode '{self.cipher_mode}' not supported")
        if self.ivgen_alg is not None and self.ivgen_alg not in IVGEN_ALGS:
            raise CryptoError(f"IV generator '{self.ivgen_alg}' not supported")
        if self.ivgen_hash_alg is not None and self.ivgen_hash_alg not in HASH_NAMES:
            raise CryptoError(f"Hash algorithm '{self.ivgen_hash_alg}' not supported")
        if self.ivgen_alg is None and self.cipher_mode != "ecb":
            raise CryptoError(
                f"Cipher mode '{self.cipher_mode}' needs an IV generator")
        if self.ivgen_alg == "essiv" and self.ivgen_hash_alg is None:
            raise CryptoError("Missing IV generator hash specification")

    def key_length(self) -> int:
        """Bytes of the volume key (XTS takes two cipher keys)."""
        length = CIPHER_KEY_LENGTHS[self.cipher_alg]
        return length * 2 if self.cipher_mode == "xts" else length

    def block_size(self) -> int:
        return CIPHER_BLOCK_SIZES[self.cipher_alg]

    def iv_length(self) -> int:
        """QEMU's qcrypto_cipher_get_iv_len: one block, none for ECB."""
        return 0 if self.cipher_mode == "ecb" else self.block_size()

    def ivgen_cipher_alg(self) -> str:
        """The cipher ESSIV encrypts sector numbers with (dm-crypt quirk)."""
        if self.ivgen_alg != "essiv":
            return self.cipher_alg
        return _essiv_cipher_alg(self.cipher_alg, self.ivgen_hash_alg)


def _essiv_cipher_alg(cipher_alg: str, hash_name: str) -> str:
    digest_size = hash_digest_size(hash_name)
    if CIPHER_KEY_LENGTHS[cipher_alg] == digest_size:
        return cipher_alg
    family = cipher_alg.split("-")[0]
    if family in _ESSIV_FAMILY_TEXT:
        candidate = f"{family}-{digest_size * 8}"
        if candidate in CIPHER_KEY_LENGTHS:
            return candidate
        raise CryptoError(f"No {_ESSIV_FAMILY_TEXT[family]} cipher with key size "
                          f"{digest_size} available")
    raise CryptoError(f"Cipher {cipher_alg} not supported with essiv")


def parse_luks_cipher(cipher_name: str, cipher_mode: str, key_bytes: int) -> CipherSpec:
    """The LUKS header's cipher strings ("aes", "xts-plain64", 64) as a spec.

    Checks in QEMU's order (qcrypto_block_luks_parse_header) with its texts,
    then that this installation can run the cipher.  One extension: bare
    "ecb", which cryptsetup writes for aes-ecb and QEMU 7.2 rejects
    ("Unexpected cipher mode string format 'ecb'"), is accepted.
    """
    mode, sep, ivgen_name = cipher_mode.partition("-")
    if not sep:
        if cipher_mode != "ecb":
            raise CryptoError(f"Unexpected cipher mode string format '{cipher_mode}'")
        ivgen_name = None
    ivhash_name = None
    if ivgen_name is not None and ":" in ivgen_name:
        ivgen_name, _, ivhash_name = ivgen_name.partition(":")
        if ivhash_name not in HASH_NAMES:
            raise CryptoError(f"Hash algorithm '{ivhash_name}' not supported")
    if mode not in CIPHER_MODES:
        raise CryptoError(f"Cipher mode '{mode}' not supported")
    lookup_bytes = key_bytes // 2 if mode == "xts" else key_bytes
    cipher_alg = _LUKS_CIPHER_NAMES.get(cipher_name, {}).get(lookup_bytes)
    if cipher_alg is None:
        raise CryptoError(f"Algorithm '{cipher_name}' with key size {lookup_bytes} "
                          f"bytes not supported")
    if mode == "xts" and key_bytes % 2:
        raise CryptoError("XTS cipher key length should be a multiple of 2")
    if ivgen_name is not None and ivgen_name not in IVGEN_ALGS:
        raise CryptoError(f"IV generator '{ivgen_name}' not supported")
    if ivgen_name == "essiv" and ivhash_name is None:
        raise CryptoError("Missing IV generator hash specification")
    spec = CipherSpec(cipher_alg, mode, ivgen_name, ivhash_name)
    spec.ivgen_cipher_alg()   # ESSIV's cipher must exist (QEMU texts)
    check_cipher_supported(spec)
    return spec


def format_luks_cipher(spec: CipherSpec) -> tuple[str, str]:
    """(cipher_name, cipher_mode) exactly as QEMU writes them in the header."""
    name = _LUKS_NAME_OF.get(spec.cipher_alg)
    if name is None:
        raise CryptoError(f"Algorithm '{spec.cipher_alg}' not supported")
    if spec.ivgen_alg is None:
        mode = spec.cipher_mode
    elif spec.ivgen_hash_alg is not None:
        mode = f"{spec.cipher_mode}-{spec.ivgen_alg}:{spec.ivgen_hash_alg}"
    else:
        mode = f"{spec.cipher_mode}-{spec.ivgen_alg}"
    if len(name) >= 32:   # QCRYPTO_BLOCK_LUKS_CIPHER_NAME_LEN, with the NUL
        raise CryptoError(f"Cipher name '{name}' is too long for LUKS header")
    if len(mode) >= 32:
        raise CryptoError(f"Cipher mode '{mode}' is too long for LUKS header")
    return name, mode


def _algorithm(cipher_alg: str, key: bytearray):
    """The `cryptography` algorithm object; it keeps a reference to `key`."""
    if cipher_alg.startswith("aes-"):
        return algorithms.AES(key)
    if cipher_alg == "cast5-128" and CAST5 is not None:
        return CAST5(key)
    if cipher_alg == "3des" and TripleDES is not None:
        return TripleDES(key)
    if cipher_alg == "des" and TripleDES is not None:
        # Three equal DES keys make 3DES compute single DES.
        return TripleDES(key * 3)
    family = cipher_alg.split("-")[0].capitalize()
    raise CryptoError(f"Cipher algorithm '{cipher_alg}' not supported: the "
                      f"cryptography library offers no {family}")


def _mode(cipher_mode: str, iv: bytes):
    if cipher_mode == "ecb":
        return modes.ECB()
    if cipher_mode == "cbc":
        return modes.CBC(iv)
    if cipher_mode == "ctr":
        return modes.CTR(iv)
    return modes.XTS(iv)


_probe_lock = threading.Lock()
_probed: dict[tuple[str, str], str | None] = {}


def _probe(cipher_alg: str, cipher_mode: str) -> str | None:
    """None if `cryptography` runs cipher_alg in cipher_mode, else why not."""
    with _probe_lock:
        if (cipher_alg, cipher_mode) not in _probed:
            key_length = CIPHER_KEY_LENGTHS[cipher_alg]
            block = CIPHER_BLOCK_SIZES[cipher_alg]
            if cipher_mode == "xts":
                key_length *= 2
            key = bytearray(range(1, key_length + 1))
            reason = None
            try:
                algorithm = _algorithm(cipher_alg, key)
                iv = bytes(block) if cipher_mode != "ecb" else b""
                Cipher(algorithm, _mode(cipher_mode, iv)).encryptor().update(
                    bytes(2 * block))
            except CryptoError as err:
                reason = str(err)
            except Exception:   # UnsupportedAlgorithm, ValueError from OpenSSL
                reason = (f"Cipher algorithm '{cipher_alg}' in mode '{cipher_mode}' "
                          f"not supported by the installed cryptography/OpenSSL")
            _probed[(cipher_alg, cipher_mode)] = reason
        return _probed[(cipher_alg, cipher_mode)]


def check_cipher_supported(spec: CipherSpec) -> None:
    """CryptoError unless this installation can encrypt with `spec`."""
    if spec.cipher_mode == "xts" and spec.cipher_alg in ("des", "3des"):
        raise CryptoError("XTS mode not compatible with DES/3DES")
    reason = _probe(spec.cipher_alg, spec.cipher_mode)
    if reason is not None and not _ecb_xts_covers(spec):
        raise CryptoError(reason)
    if spec.ivgen_alg == "essiv":
        hash_algorithm(spec.ivgen_hash_alg)
        reason = _probe(spec.ivgen_cipher_alg(), "ecb")
        if reason is not None:
            raise CryptoError(reason)


def _ecb_xts_covers(spec: CipherSpec) -> bool:
    """True if _EcbXts can run spec (any AES in XTS mode)."""
    return spec.cipher_mode == "xts" and spec.cipher_alg.startswith("aes-")


def _check_key_length(spec: CipherSpec, nkey: int) -> None:
    """QEMU's qcrypto_cipher_validate_key_length texts."""
    expected = CIPHER_KEY_LENGTHS[spec.cipher_alg]
    if spec.cipher_mode == "xts":
        if spec.cipher_alg in ("des", "3des"):
            raise CryptoError("XTS mode not compatible with DES/3DES")
        if nkey % 2:
            raise CryptoError("XTS cipher key length should be a multiple of 2")
        if nkey // 2 != expected:
            raise CryptoError(f"Cipher key length {nkey} should be {expected * 2}")
    elif nkey != expected:
        raise CryptoError(f"Cipher key length {nkey} should be {expected}")


_GF128_MASK = (1 << 128) - 1


class _EcbXts:
    """AES-XTS (IEEE 1619) over AES-ECB, for what OpenSSL's XTS refuses.

    Used for XTS-AES-192 and for keys whose halves are equal; lengths are
    whole blocks, so no ciphertext stealing.
    """

    def __init__(self, key: bytearray) -> None:
        half = len(key) // 2
        self._data_key = algorithms.AES(key[:half])
        self._tweak_key = algorithms.AES(key[half:])

    def _tweaks(self, iv: bytes, nblocks: int) -> int:
        encryptor = Cipher(self._tweak_key, modes.ECB()).encryptor()
        tweak = int.from_bytes(encryptor.update(iv), "little")
        stream = bytearray()
        for _ in range(nblocks):
            stream += tweak.to_bytes(16, "little")
            carry = tweak >> 127
            tweak = ((tweak << 1) & _GF128_MASK) ^ (0x87 if carry else 0)
        return int.from_bytes(stream, "big")

    def crypt(self, iv: bytes, chunk: bytes, encrypt: bool) -> bytes:
        n = len(chunk)
        tweaks = self._tweaks(iv, n // 16)
        ecb = Cipher(self._data_key, modes.ECB())
        context = ecb.encryptor() if encrypt else ecb.decryptor()
        masked = (int.from_bytes(chunk, "big") ^ tweaks).to_bytes(n, "big")
        result = int.from_bytes(context.update(masked), "big") ^ tweaks
        return result.to_bytes(n, "big")

    def wipe(self) -> None:
        for algorithm in (self._data_key, self._tweak_key):
            key = algorithm.key
            if isinstance(key, bytearray):
                key[:] = bytes(len(key))


class SectorCipher:
    """Encrypts and decrypts runs of 512-byte sectors with per-sector IVs.

    Callable from worker threads; one instance is not meant to be shared by
    concurrent callers while wipe() may run.
    """

    SECTOR_SIZE = SECTOR_SIZE

    def __init__(self, spec: CipherSpec, key: bytes | bytearray) -> None:
        _check_key_length(spec, len(key))
        check_cipher_supported(spec)
        self.spec = spec
        self._block = spec.block_size()
        self._iv_length = spec.iv_length()
        self._key = bytearray(key)
        self._wiped = False
        self._xts_fallback: _EcbXts | None = None
        self._algorithm = None
        half = len(self._key) // 2
        if spec.cipher_mode == "xts" and (
                self._key[:half] == self._key[half:]
                or _probe(spec.cipher_alg, "xts") is not None):
            self._xts_fallback = _EcbXts(self._key)
        else:
            self._algorithm = _algorithm(spec.cipher_alg, self._key)
        self._essiv_key: bytearray | None = None
        self._essiv_algorithm = None
        if spec.ivgen_alg == "essiv" and self._iv_length:
            self._essiv_key = self._essiv_salt(spec)
            self._essiv_algorithm = _algorithm(spec.ivgen_cipher_alg(), self._essiv_key)

    def _essiv_salt(self, spec: CipherSpec) -> bytearray:
        """H(key), cut to the ESSIV cipher's key length (QEMU ivgen-essiv.c)."""
        digest = hashes.Hash(hash_algorithm(spec.ivgen_hash_alg))
        digest.update(bytes(self._key))
        salt = bytearray(digest.finalize())
        keep = min(len(salt), CIPHER_KEY_LENGTHS[spec.ivgen_cipher_alg()])
        del salt[keep:]
        return salt

    def __repr__(self) -> str:
        return f"<SectorCipher {self.spec!r}{' wiped' if self._wiped else ''}>"

    def _ivs(self, first_sector: int, count: int) -> list[bytes]:
        niv = self._iv_length
        ivgen = self.spec.ivgen_alg
        sectors = range(first_sector, first_sector + count)
        if ivgen == "plain":
            return [((s & 0xFFFFFFFF).to_bytes(4, "little") + bytes(niv))[:niv]
                    for s in sectors]
        if ivgen == "plain64":
            return [((s & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little") + bytes(niv))[:niv]
                    for s in sectors]
        # essiv: all the sector numbers of the run encrypted in one ECB call.
        essiv_block = CIPHER_BLOCK_SIZES[self.spec.ivgen_cipher_alg()]
        plain = b"".join(((s & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little")
                          + bytes(essiv_block))[:essiv_block] for s in sectors)
        encrypted = Cipher(self._essiv_algorithm, modes.ECB()).encryptor().update(plain)
        return [(encrypted[i:i + essiv_block] + bytes(niv))[:niv]
                for i in range(0, len(encrypted), essiv_block)]

    def _crypt(self, sector: int, data: bytes, encrypt: bool) -> bytes:
        if self._wiped:
            raise CryptoError("The cipher's key has been wiped")
        length = len(data)
        if length % self._block:
            raise CryptoError(f"Length {length} must be a multiple of block size "
                              f"{self._block}")
        if sector < 0:
            raise CryptoError(f"Sector {sector} must not be negative")
        if length == 0:
            return b""
        if not self._iv_length:   # ECB: the IV generator has nothing to do
            cipher = Cipher(self._algorithm, modes.ECB())
            context = cipher.encryptor() if encrypt else cipher.decryptor()
            return context.update(data) + context.finalize()
        view = memoryview(data)
        count = -(-length // SECTOR_SIZE)
        out = bytearray(length)
        mode = self.spec.cipher_mode
        for index, iv in enumerate(self._ivs(sector, count)):
            start = index * SECTOR_SIZE
            chunk = view[start:start + SECTOR_SIZE]
            if self._xts_fallback is not None:
                out[start:start + len(chunk)] = self._xts_fallback.crypt(
                    iv, bytes(chunk), encrypt)
                continue
            cipher = Cipher(self._algorithm, _mode(mode, iv))
            context = cipher.encryptor() if encrypt else cipher.decryptor()
            out[start:start + len(chunk)] = context.update(chunk) + context.finalize()
        view.release()
        return bytes(out)

    def encrypt(self, sector: int, data: bytes) -> bytes:
        """Encrypt sectors starting at `sector`.

        `data` is whole 512-byte sectors; a shorter final sector is allowed
        if it is whole cipher blocks (LUKS key material for 24-byte keys
        ends mid-sector, and QEMU encrypts it that way).
        """
        return self._crypt(sector, data, True)

    def decrypt(self, sector: int, data: bytes) -> bytes:
        """Decrypt sectors starting at `sector` (same rules as encrypt)."""
        return self._crypt(sector, data, False)

    def wipe(self) -> None:
        """Overwrite the key material this object holds; it is unusable after."""
        for buffer in (self._key, self._essiv_key):
            if buffer is not None:
                buffer[:] = bytes(len(buffer))
        for algorithm in (self._algorithm, self._essiv_algorithm):
            key = getattr(algorithm, "key", None)
            if isinstance(key, bytearray):
                key[:] = bytes(len(key))
        if self._xts_fallback is not None:
            self._xts_fallback.wipe()
        self._wiped = True
