"""Sector ciphers: the LUKS payload and key-material encryption.

A LUKS volume is encrypted in sectors (LUKS1: 512 bytes; LUKS2: 512..4096),
each with its own IV made by an IV generator from the sector number (QEMU
crypto/ivgen-*.c, crypto/block.c's cipher helpers, dm-crypt):

* plain   - the sector number's low 32 bits, little-endian, zero padded;
* plain64 - the sector number as 64-bit little-endian, zero padded;
* essiv   - the 64-bit little-endian sector number, zero padded to a cipher
  block and encrypted (ECB) under H(volume key).  dm-crypt's quirk, kept by
  QEMU: the ESSIV cipher is the same family as the payload cipher but with
  a key as long as the digest (aes-128 + essiv:sha256 uses AES-256).

The IV number is (sector << iv_shift): LUKS2 with 4096-byte sectors counts
IVs in 512-byte units (iv_shift 3).

Names are QEMU's QAPI names (cipher_alg "aes-256", cipher_mode "xts",
ivgen_alg "plain64"); the LUKS header spells them "aes" / "xts-plain64" and
parse_luks_cipher / format_luks_cipher translate, with QEMU's checks and
error texts (crypto/block-luks.c, crypto/cipher.c).

Only what `cryptography` computes is supported: AES in every mode, CAST5
and DES/3DES in ECB/CBC when the OpenSSL build offers them; Serpent and
Twofish never.

Speed (guest I/O goes through here).  A `cryptography` context per sector
costs ~3.5 us of Python and key setup, capping any mode near 130 MiB/s, so
multi-sector requests are vectorised: all IVs (and ESSIV's encryption of
them) at once in numpy, then one ECB call over the whole request:

* XTS: the tweaks T = E_K2(IV) of all sectors in one ECB call, every
  block's T * x**j in numpy (uint64 pairs), one ECB call under K1 over the
  masked data.  This also runs what OpenSSL's XTS refuses but QEMU (nettle)
  and the kernel accept: XTS-AES-192, and keys whose halves are equal.
* CBC decryption: P_i = D(C_i) xor C_(i-1) is one ECB call and a shifted
  xor.  CBC encryption chains within a sector, but the sectors' chains are
  independent: block j of every sector goes in one ECB call.
* CTR keeps a context per sector (the IV starts each sector's counter).

Short requests still take one context per sector, where that is faster
(_PER_SECTOR_MAX, measured by tests/benchmarks/sector_crypto.py).  Large
buffers are reused per thread (_buffer): fresh ones cost a page fault per
4 KiB, more than the AES itself.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from qmpd.crypto.errors import CryptoError
from qmpd.crypto.hashes import HASH_NAMES, hash_algorithm, hash_digest_size

# Any: the class, or None where this cryptography has none. Their stubs
# want bytes keys; _algorithm() passes the bytearray that wipe() zeroes
# (cryptography takes any buffer).
CAST5: Any
TripleDES: Any
try:  # cryptography >= 43 keeps the old ciphers apart
    from cryptography.hazmat.decrepit.ciphers.algorithms import CAST5, TripleDES
except ImportError:  # pragma: no cover - older cryptography
    CAST5 = getattr(algorithms, "CAST5", None)
    TripleDES = getattr(algorithms, "TripleDES", None)

SECTOR_SIZE = 512

# crypto/cipher.c: alg_key_len and alg_block_len.
CIPHER_KEY_LENGTHS: dict[str, int] = {
    "aes-128": 16,
    "aes-192": 24,
    "aes-256": 32,
    "des": 8,
    "3des": 24,
    "cast5-128": 16,
    "serpent-128": 16,
    "serpent-192": 24,
    "serpent-256": 32,
    "twofish-128": 16,
    "twofish-192": 24,
    "twofish-256": 32,
}
CIPHER_BLOCK_SIZES: dict[str, int] = {
    "aes-128": 16,
    "aes-192": 16,
    "aes-256": 16,
    "des": 8,
    "3des": 8,
    "cast5-128": 8,
    "serpent-128": 16,
    "serpent-192": 16,
    "serpent-256": 16,
    "twofish-128": 16,
    "twofish-192": 16,
    "twofish-256": 16,
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
_LUKS_NAME_OF = {alg: name for name, sizes in _LUKS_CIPHER_NAMES.items() for alg in sizes.values()}
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
            raise CryptoError(f"Cipher mode '{self.cipher_mode}' needs an IV generator")
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
        assert self.ivgen_hash_alg is not None  # __post_init__ wants one for essiv
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
        raise CryptoError(
            f"No {_ESSIV_FAMILY_TEXT[family]} cipher with key size {digest_size} available"
        )
    raise CryptoError(f"Cipher {cipher_alg} not supported with essiv")


def parse_luks_cipher(cipher_name: str, cipher_mode: str, key_bytes: int) -> CipherSpec:
    """The LUKS header's cipher strings ("aes", "xts-plain64", 64) as a spec.

    Checks in QEMU's order (qcrypto_block_luks_parse_header) with its texts,
    then that this installation can run the cipher.  One extension: bare
    "ecb", which cryptsetup writes for aes-ecb and QEMU 7.2 rejects
    ("Unexpected cipher mode string format 'ecb'"), is accepted.
    """
    ivgen_name: str | None
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
        raise CryptoError(
            f"Algorithm '{cipher_name}' with key size {lookup_bytes} bytes not supported"
        )
    if mode == "xts" and key_bytes % 2:
        raise CryptoError("XTS cipher key length should be a multiple of 2")
    if ivgen_name is not None and ivgen_name not in IVGEN_ALGS:
        raise CryptoError(f"IV generator '{ivgen_name}' not supported")
    if ivgen_name == "essiv" and ivhash_name is None:
        raise CryptoError("Missing IV generator hash specification")
    spec = CipherSpec(cipher_alg, mode, ivgen_name, ivhash_name)
    spec.ivgen_cipher_alg()  # ESSIV's cipher must exist (QEMU texts)
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
    if len(name) >= 32:  # QCRYPTO_BLOCK_LUKS_CIPHER_NAME_LEN, with the NUL
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
    raise CryptoError(
        f"Cipher algorithm '{cipher_alg}' not supported: the "
        f"cryptography library offers no {family}"
    )


def _mode(cipher_mode: str, iv: bytes):
    if cipher_mode == "ecb":
        return modes.ECB()
    if cipher_mode == "cbc":
        return modes.CBC(iv)
    if cipher_mode == "ctr":
        return modes.CTR(iv)
    return modes.XTS(iv)


try:  # the context factory under Cipher(): skips ~1.5 us of Python checks a sector
    from cryptography.hazmat.bindings._rust import openssl as _rust_openssl

    _make_encryptor = _rust_openssl.ciphers.create_encryption_ctx
    _make_decryptor = _rust_openssl.ciphers.create_decryption_ctx
except (ImportError, AttributeError):  # pragma: no cover - other cryptography versions

    def _make_encryptor(algorithm, mode):
        return Cipher(algorithm, mode).encryptor()

    def _make_decryptor(algorithm, mode):
        return Cipher(algorithm, mode).decryptor()


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
                Cipher(algorithm, _mode(cipher_mode, iv)).encryptor().update(bytes(2 * block))
            except CryptoError as err:
                reason = str(err)
            except Exception:  # UnsupportedAlgorithm, ValueError from OpenSSL
                reason = (
                    f"Cipher algorithm '{cipher_alg}' in mode '{cipher_mode}' "
                    f"not supported by the installed cryptography/OpenSSL"
                )
            _probed[(cipher_alg, cipher_mode)] = reason
        return _probed[(cipher_alg, cipher_mode)]


#: The modes QEMU's nettle backend offers per cipher family (crypto/cipher-nettle.c.inc).
_QEMU_MODES = {
    "aes": CIPHER_MODES,
    "serpent": CIPHER_MODES,
    "twofish": CIPHER_MODES,
    "cast5": ("ecb", "cbc", "ctr"),
    "des": ("ecb", "cbc", "ctr"),
    "3des": ("ecb", "cbc", "ctr"),
}


def check_cipher_supported(spec: CipherSpec) -> None:
    """CryptoError unless this installation can encrypt with `spec`: QEMU's
    checks and texts first (qcrypto_cipher_new), then what `cryptography` runs."""
    if spec.cipher_mode == "xts" and spec.cipher_alg in ("des", "3des"):
        raise CryptoError("XTS mode not compatible with DES/3DES")
    if spec.cipher_mode not in _QEMU_MODES[spec.cipher_alg.split("-")[0]]:
        raise CryptoError(f"Unsupported cipher mode {spec.cipher_mode}")
    reason = _probe(spec.cipher_alg, spec.cipher_mode)
    if reason is not None and not _ecb_xts_covers(spec):
        raise CryptoError(reason)
    if spec.ivgen_alg == "essiv":
        assert spec.ivgen_hash_alg is not None  # CipherSpec wants one for essiv
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


_U64 = np.dtype("<u8")  # IEEE 1619 and the IV generators are little-endian
_M64 = (1 << 64) - 1
_GROUP = 32  # XTS blocks per doubling group: one 512-byte unit
_J = np.arange(1, _GROUP, dtype=np.uint64)
# Bytes masked at a time.  Big: each numpy call releases the GIL, and a busy
# Python thread can keep it for a switch interval (5 ms) before handing it
# back, so fewer calls per request means less such waiting; 1 MiB costs no
# speed against 256 KiB (measured) and bounds the scratch memory.
_XTS_CHUNK = 1 << 20
# Up to this many sectors (by sector size) a request goes through one
# `cryptography` context per sector; beyond, the numpy paths are faster
# (measured: tests/benchmarks/sector_crypto.py --crossover).
_PER_SECTOR_MAX = {
    "xts": {512: 8, 1024: 12, 2048: 24, 4096: 40},
    "cbc-decrypt": {512: 3, 1024: 3, 2048: 3, 4096: 2},
    "cbc-encrypt": {512: 20, 1024: 32, 2048: 56, 4096: 96},
}


_SCRATCH_MAX = (4 << 20) + 16  # bytes kept per scratch buffer (4 MiB requests)
_POOL_MAX = 4  # scratch sets kept for later requests (<= 8 MiB each)
_pool: list[dict[str, np.ndarray]] = []
_pool_lock = threading.Lock()
_lent = threading.local()


@contextmanager
def _scratch() -> Iterator[None]:
    """Lend the calling thread a set of scratch buffers for one request.

    Big buffers are reused rather than allocated per request: glibc hands
    freed megabytes back to the kernel and the next request pays a page
    fault per 4 KiB (measured: 600 faults and 1 ms of a 1.5 ms 1 MiB
    request).  A pool, not one set per thread: trio runs I/O in up to 40
    worker threads, and the pool bounds what stays allocated.
    """
    with _pool_lock:
        buffers = _pool.pop() if _pool else {}
    _lent.buffers = buffers
    try:
        yield
    except BaseException:
        buffers.clear()  # a request cut short may have left data in them
        raise
    finally:
        _lent.buffers = None
        with _pool_lock:
            if buffers and len(_pool) < _POOL_MAX:
                _pool.append(buffers)


def _buffer(slot: str, nbytes: int) -> np.ndarray:
    """nbytes of the lent scratch buffer `slot` (uint8), else a fresh array.

    Callers zero the buffers that held data (_clear) before returning, so
    no plaintext outlives the request here; IVs and XTS masks stay (derived
    from keys, but useless without them).
    """
    buffers = getattr(_lent, "buffers", None)
    if buffers is None or nbytes > _SCRATCH_MAX:
        return np.empty(nbytes, np.uint8)
    buffer = buffers.get(slot)
    if buffer is None or len(buffer) < nbytes:
        # zeros, not empty: the pool keeps it, with whatever parts of it no
        # request writes (update_into's slack), and those must not be old heap
        buffer = buffers[slot] = np.zeros(nbytes, np.uint8)
    return buffer[:nbytes]


def _clear(*arrays: np.ndarray) -> None:
    for array in arrays:
        array.fill(0)


def _ecb(algorithm, src: np.ndarray, encrypt: bool, slot: str) -> np.ndarray:
    """ECB over the uint8 array src into scratch `slot`: len(src) bytes.

    update_into, not update: update() allocates its output per call, and
    that costs the page faults above (7x slower at 1 MiB).
    """
    out = _buffer(slot, len(src) + 16)
    ecb = Cipher(algorithm, modes.ECB())
    context = ecb.encryptor() if encrypt else ecb.decryptor()
    # ndarrays are buffers; cryptography's Buffer union leaves them out.
    context.update_into(src, out)  # type: ignore[arg-type]
    return out[: len(src)]


def _times_x(lo: np.ndarray, hi: np.ndarray, j, out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) * x**j in GF(2^128), IEEE 1619 order, for 1 <= j <= 32.

    The j bits shifted out of the top are reduced by x^128 = x^7+x^2+x+1:
    carry-less c * 0x87, at most 39 bits, so it stays in the low word.
    out is (4, broadcast shape): the new words, then two scratch arrays
    (in place, so that no temporaries come and go per request).
    """
    new_lo, new_hi, carry, spare = out
    down = np.uint64(64) - j
    np.right_shift(hi, down, out=carry)
    np.left_shift(hi, j, out=new_hi)
    np.right_shift(lo, down, out=spare)
    new_hi |= spare
    np.left_shift(lo, j, out=new_lo)
    new_lo ^= carry
    for bit in (1, 2, 7):
        np.left_shift(carry, np.uint64(bit), out=spare)
        new_lo ^= spare
    return new_lo, new_hi


def _times_x64(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) * x**64: the words move up, hi * 0x87 (71 bits) comes back."""
    new_lo = hi ^ (hi << np.uint64(1)) ^ (hi << np.uint64(2)) ^ (hi << np.uint64(7))
    new_hi = lo ^ (hi >> np.uint64(63)) ^ (hi >> np.uint64(62)) ^ (hi >> np.uint64(57))
    return new_lo, new_hi


class _EcbXts:
    """AES-XTS (IEEE 1619) of whole sectors, vectorised over AES-ECB.

    One ECB call under the tweak key turns every sector's IV into its tweak
    T; numpy computes each block's T * x**j; one ECB call under the data key
    does all the blocks, masked before and after.  Lengths are whole blocks,
    so no ciphertext stealing.  Also runs what OpenSSL's XTS refuses:
    XTS-AES-192 and keys whose halves are equal.
    """

    def __init__(self, key: bytearray) -> None:
        half = len(key) // 2
        self._data_key = algorithms.AES(key[:half])
        self._tweak_key = algorithms.AES(key[half:])

    def _masks(self, tweaks: np.ndarray, groups: int) -> np.ndarray:
        """(sectors * groups * 32, 2) words: T * x**j for every block."""
        lo = np.ascontiguousarray(tweaks[:, 0])
        hi = np.ascontiguousarray(tweaks[:, 1])
        if groups > 1:  # sectors over 512 bytes: T * x**(32 g) starts group g
            group_lo = np.empty((len(lo), groups), _U64)
            group_hi = np.empty((len(lo), groups), _U64)
            group_lo[:, 0], group_hi[:, 0] = lo, hi
            group_lo[:, 1], group_hi[:, 1] = _times_x(
                lo, hi, np.uint64(_GROUP), np.empty((4, len(lo)), _U64)
            )
            done = 2  # then groups [done, 2 done) = groups [0, done) * x**(32 done)
            while done < groups:
                step_lo, step_hi = group_lo[:, :done], group_hi[:, :done]
                for _ in range(done // 2):  # x**(32 done) = (x**64)**(done / 2)
                    step_lo, step_hi = _times_x64(step_lo, step_hi)
                group_lo[:, done : 2 * done], group_hi[:, done : 2 * done] = step_lo, step_hi
                done *= 2
            lo, hi = group_lo.reshape(-1), group_hi.reshape(-1)
        count = len(lo)
        masks = _buffer("masks", count * _GROUP * 16).view(_U64).reshape(count, _GROUP, 2)
        work = _buffer("gf", 4 * count * (_GROUP - 1) * 8).view(_U64)
        masks[:, 0, 0], masks[:, 0, 1] = lo, hi
        masks[:, 1:, 0], masks[:, 1:, 1] = _times_x(
            lo[:, None], hi[:, None], _J, work.reshape(4, count, _GROUP - 1)
        )
        return masks.reshape(-1, 2)

    def crypt(self, ivs, data, encrypt: bool, sector_size: int = SECTOR_SIZE) -> bytes:
        """XTS of data, sector_size bytes per IV (16 bytes each, in ivs).

        The last sector may be short (whole blocks).
        """
        length = len(data)
        words = np.frombuffer(data, _U64)
        ivs = np.frombuffer(ivs, np.uint8)
        tweaks = _ecb(self._tweak_key, ivs, True, "tweaks").view(_U64).reshape(-1, 2)
        groups = sector_size // (16 * _GROUP)
        per_chunk = max(1, _XTS_CHUNK // sector_size)
        out = _buffer("out", length + 16)
        masked = _buffer("masked", min(length, per_chunk * sector_size)).view(_U64)
        ecb = Cipher(self._data_key, modes.ECB())
        context = ecb.encryptor() if encrypt else ecb.decryptor()
        for first in range(0, len(tweaks), per_chunk):
            start = first * sector_size
            stop = min(length, start + per_chunk * sector_size)
            masks = self._masks(tweaks[first : first + per_chunk], groups).reshape(-1)
            masks = masks[: (stop - start) // 8]
            chunk = masked[: len(masks)]
            np.bitwise_xor(words[start // 8 : stop // 8], masks, out=chunk)
            context.update_into(chunk.view(np.uint8), out[start : stop + 15])  # type: ignore[arg-type]  # ndarrays, see _ecb
            result = out[start:stop].view(_U64)
            np.bitwise_xor(result, masks, out=result)
        try:
            return out[:length].tobytes()
        finally:
            _clear(out, masked)

    def wipe(self) -> None:
        for algorithm in (self._data_key, self._tweak_key):
            key = algorithm.key
            if isinstance(key, bytearray):
                key[:] = bytes(len(key))


class SectorCipher:
    """Encrypts and decrypts runs of sectors with per-sector IVs.

    sector_size (LUKS2: 512..4096) is what `sector` counts; the IV number of
    the k-th sector of a request is ((sector + k) << iv_shift) + iv_offset,
    mod 2**64 (LUKS2 with 4096-byte sectors counts IVs in 512-byte units:
    iv_shift 3; its segment's iv_tweak is the offset, as dm-crypt's).

    Callable from worker threads; one instance is not meant to be shared by
    concurrent callers while wipe() may run.
    """

    SECTOR_SIZE = SECTOR_SIZE

    def __init__(
        self,
        spec: CipherSpec,
        key: bytes | bytearray,
        *,
        sector_size: int = SECTOR_SIZE,
        iv_shift: int = 0,
        iv_offset: int = 0,
    ) -> None:
        _check_key_length(spec, len(key))
        check_cipher_supported(spec)
        if (
            not isinstance(sector_size, int)
            or not 512 <= sector_size <= 4096
            or sector_size & (sector_size - 1)
        ):
            raise CryptoError(f"Sector size {sector_size} must be a power of two from 512 to 4096")
        if not isinstance(iv_shift, int) or not 0 <= iv_shift < 64:
            raise CryptoError(f"IV shift {iv_shift} must be from 0 to 63")
        if not isinstance(iv_offset, int) or not 0 <= iv_offset <= _M64:
            raise CryptoError(f"IV offset {iv_offset} must be a 64-bit unsigned number")
        self.spec = spec
        self._iv_offset = iv_offset
        self.sector_size = sector_size
        self._iv_shift = iv_shift
        self._block = spec.block_size()
        self._iv_length = spec.iv_length()
        self._key = bytearray(key)
        self._wiped = False
        self._ecb_xts: _EcbXts | None = None
        self._algorithm = None  # None: XTS only through _EcbXts
        if spec.cipher_mode == "xts":
            self._ecb_xts = _EcbXts(self._key)
        half = len(self._key) // 2
        if spec.cipher_mode != "xts" or (
            self._key[:half] != self._key[half:] and _probe(spec.cipher_alg, "xts") is None
        ):
            self._algorithm = _algorithm(spec.cipher_alg, self._key)
        self._essiv_key: bytearray | None = None
        self._essiv_algorithm = None
        if spec.ivgen_alg == "essiv" and self._iv_length:
            self._essiv_key = self._essiv_salt(spec)
            self._essiv_algorithm = _algorithm(spec.ivgen_cipher_alg(), self._essiv_key)

    def _essiv_salt(self, spec: CipherSpec) -> bytearray:
        """H(key), cut to the ESSIV cipher's key length (QEMU ivgen-essiv.c)."""
        assert spec.ivgen_hash_alg is not None  # CipherSpec wants one for essiv
        digest = hashes.Hash(hash_algorithm(spec.ivgen_hash_alg))
        digest.update(bytes(self._key))
        salt = bytearray(digest.finalize())
        keep = min(len(salt), CIPHER_KEY_LENGTHS[spec.ivgen_cipher_alg()])
        del salt[keep:]
        return salt

    def __repr__(self) -> str:
        return f"<SectorCipher {self.spec!r}{' wiped' if self._wiped else ''}>"

    def _ivs(self, first_sector: int, count: int) -> np.ndarray:
        """The IVs of `count` sectors as (count, iv_length // 8) words."""
        sectors = np.arange(count, dtype=np.uint64)
        sectors += np.uint64(first_sector & _M64)
        return self._ivs_of(sectors)

    def _ivs_of(self, sectors: np.ndarray) -> np.ndarray:
        """The IVs of these sector numbers (uint64) as (count, iv_length // 8) words."""
        count = len(sectors)
        numbers = sectors << np.uint64(self._iv_shift)  # wraps mod 2**64
        if self._iv_offset:
            numbers += np.uint64(self._iv_offset)
        if self.spec.ivgen_alg == "plain":
            numbers &= np.uint64(0xFFFFFFFF)
        if self.spec.ivgen_alg != "essiv":
            ivs = np.zeros((count, self._iv_length // 8), _U64)
            ivs[:, 0] = numbers
            return ivs
        # essiv: all the sector numbers of the run encrypted in one ECB call.
        essiv_block = CIPHER_BLOCK_SIZES[self.spec.ivgen_cipher_alg()]
        plain = np.zeros((count, essiv_block // 8), _U64)
        plain[:, 0] = numbers
        encrypted = _ecb(self._essiv_algorithm, plain.view(np.uint8).reshape(-1), True, "ivs")
        return np.ascontiguousarray(
            encrypted.view(_U64).reshape(count, -1)[:, : self._iv_length // 8]
        )

    def _iv_list(self, first_sector: int, count: int) -> list[bytes]:
        """_ivs for the per-sector path: for a few sectors Python beats numpy."""
        shift, niv = self._iv_shift, self._iv_length
        offset = self._iv_offset
        numbers = [(((first_sector + k) << shift) + offset) & _M64 for k in range(count)]
        if self.spec.ivgen_alg == "plain":
            return [(n & 0xFFFFFFFF).to_bytes(4, "little").ljust(niv, b"\0") for n in numbers]
        if self.spec.ivgen_alg == "plain64":
            return [n.to_bytes(8, "little").ljust(niv, b"\0") for n in numbers]
        essiv_block = CIPHER_BLOCK_SIZES[self.spec.ivgen_cipher_alg()]
        plain = b"".join(n.to_bytes(8, "little").ljust(essiv_block, b"\0") for n in numbers)
        assert self._essiv_algorithm is not None  # set for essiv with an IV
        encrypted = Cipher(self._essiv_algorithm, modes.ECB()).encryptor().update(plain)
        return [encrypted[i : i + niv] for i in range(0, len(encrypted), essiv_block)]

    def _per_sector(self, sector: int, count: int, data: bytes | bytearray, encrypt: bool) -> bytes:
        """One `cryptography` context per sector: CTR, and short requests."""
        size = self.sector_size
        mode = self.spec.cipher_mode
        make = _make_encryptor if encrypt else _make_decryptor
        algorithm = self._algorithm
        assert algorithm is not None  # _per_sector_is_faster() is False without it
        parts = []
        with memoryview(data) as view:
            for start, iv in zip(
                range(0, len(data), size), self._iv_list(sector, count), strict=False
            ):
                parts.append(make(algorithm, _mode(mode, iv)).update(view[start : start + size]))
        return b"".join(parts)

    def _cbc_decrypt(self, ivs: np.ndarray, data: bytes | bytearray) -> bytes:
        """P_i = D(C_i) xor C_(i-1), C_(-1) being the sector's IV: one ECB call."""
        words = self._block // 8
        per_sector = self.sector_size // self._block
        cipher_blocks = np.frombuffer(data, _U64).reshape(-1, words)
        out = _ecb(self._algorithm, np.frombuffer(data, np.uint8), False, "out")
        plain = out.view(_U64).reshape(-1, words)
        plain[1:] ^= cipher_blocks[:-1]
        # Each sector's first block took the previous sector's last block:
        # xor that back out along with the IV in.
        first = ivs.copy()
        first[1:] ^= cipher_blocks[per_sector - 1 : -1 : per_sector][: len(ivs) - 1]
        plain[::per_sector] ^= first
        try:
            return out.tobytes()
        finally:
            _clear(out)

    def _cbc_encrypt(self, ivs: np.ndarray, data: bytes | bytearray) -> bytes:
        """CBC chains are sequential, but the sectors' chains are independent.

        Block j of every sector in one ECB call: sector_size / block calls,
        however many sectors.  A short last sector is padded and cut off.
        """
        count, words = ivs.shape
        per_sector = self.sector_size // self._block
        nblocks = len(data) // self._block
        flat = _buffer("out", count * self.sector_size).view(_U64).reshape(-1, words)
        flat[:nblocks] = np.frombuffer(data, _U64).reshape(-1, words)
        flat[nblocks:] = 0
        work = flat.reshape(count, per_sector, words)
        column = np.empty((count, words), _U64)
        encrypted = np.empty(count * self._block + 16, np.uint8)
        chained = encrypted[: count * self._block].view(_U64).reshape(count, words)
        assert self._algorithm is not None  # CBC: see __init__
        ecb = Cipher(self._algorithm, modes.ECB()).encryptor()
        previous = ivs
        for j in range(per_sector):
            np.bitwise_xor(work[:, j], previous, out=column)
            ecb.update_into(column.view(np.uint8).reshape(-1), encrypted)  # type: ignore[arg-type]  # ndarrays, see _ecb
            work[:, j] = previous = chained
        try:
            return flat.view(np.uint8).reshape(-1)[: len(data)].tobytes()
        finally:
            _clear(flat, column)

    def _crypt(self, sector: int, data: bytes | bytearray, encrypt: bool) -> bytes:
        if self._wiped:
            raise CryptoError("The cipher's key has been wiped")
        length = len(data)
        if length % self._block:
            raise CryptoError(f"Length {length} must be a multiple of block size {self._block}")
        if sector < 0:
            raise CryptoError(f"Sector {sector} must not be negative")
        if length == 0:
            return b""
        count = -(-length // self.sector_size)
        if self._per_sector_is_faster(count, encrypt):
            return self._per_sector(sector, count, data, encrypt)
        with _scratch():
            return self._vectorised(sector, count, data, encrypt)

    def _per_sector_is_faster(self, count: int, encrypt: bool) -> bool:
        mode = self.spec.cipher_mode
        if mode == "ctr":
            return True
        if mode == "ecb" or self._algorithm is None:  # _algorithm: see __init__
            return False
        path = "xts" if mode == "xts" else "cbc-encrypt" if encrypt else "cbc-decrypt"
        return count <= _PER_SECTOR_MAX[path][self.sector_size]

    def _vectorised(self, sector: int, count: int, data: bytes | bytearray, encrypt: bool) -> bytes:
        """ECB, XTS and CBC through numpy, with scratch buffers lent."""
        if not self._iv_length:  # ECB: the IV generator has nothing to do
            out = _ecb(self._algorithm, np.frombuffer(data, np.uint8), encrypt, "out")
            try:
                return out.tobytes()
            finally:
                _clear(out)
        ivs = self._ivs(sector, count)
        if self.spec.cipher_mode == "xts":
            assert self._ecb_xts is not None  # set for XTS in __init__
            return self._ecb_xts.crypt(ivs, data, encrypt, self.sector_size)
        return self._cbc_encrypt(ivs, data) if encrypt else self._cbc_decrypt(ivs, data)

    def _crypt_many(self, pieces: Sequence[tuple[int, Any]], encrypt: bool) -> list[bytes]:
        """_crypt of each (sector, data), in one vectorised pass when the
        pieces together are past the per-sector crossover (a burst of 4 KiB
        reads: one numpy pass instead of 8 contexts a read)."""
        size = self.sector_size
        counts = [len(data) // size for _, data in pieces]
        total = sum(counts)
        if (
            len(pieces) < 2
            or self._wiped
            or self.spec.cipher_mode == "ctr"
            or self._per_sector_is_faster(total, encrypt)
            or any(sector < 0 or len(data) % size for sector, data in pieces)
        ):
            return [self._crypt(sector, data, encrypt) for sector, data in pieces]
        data = b"".join(data for _, data in pieces)
        with _scratch():
            if not self._iv_length:
                out = _ecb(self._algorithm, np.frombuffer(data, np.uint8), encrypt, "out")
                try:
                    joined = out.tobytes()
                finally:
                    _clear(out)
            else:
                # sector numbers: each piece's first sector, counted up along it
                firsts = np.array([sector & _M64 for sector, _ in pieces], np.uint64)
                starts = np.cumsum([0, *counts[:-1]]).astype(np.uint64)
                sectors = np.arange(total, dtype=np.uint64)
                sectors += np.repeat(firsts - starts, counts)
                ivs = self._ivs_of(sectors)
                if self.spec.cipher_mode == "xts":
                    assert self._ecb_xts is not None  # set for XTS in __init__
                    joined = self._ecb_xts.crypt(ivs, data, encrypt, size)
                else:
                    joined = (
                        self._cbc_encrypt(ivs, data) if encrypt else self._cbc_decrypt(ivs, data)
                    )
        results, at = [], 0
        with memoryview(joined) as view:
            for count in counts:
                results.append(bytes(view[at : at + count * size]))
                at += count * size
        return results

    def encrypt_many(self, pieces: Sequence[tuple[int, Any]]) -> list[bytes]:
        """encrypt() of each (sector, data) piece; whole sectors each."""
        return self._crypt_many(pieces, True)

    def decrypt_many(self, pieces: Sequence[tuple[int, Any]]) -> list[bytes]:
        """decrypt() of each (sector, data) piece; whole sectors each."""
        return self._crypt_many(pieces, False)

    def encrypt(self, sector: int, data: bytes | bytearray) -> bytes:
        """Encrypt sectors starting at `sector`.

        `data` is whole sectors; a shorter final sector is allowed if it is
        whole cipher blocks (LUKS key material for 24-byte keys ends
        mid-sector, and QEMU encrypts it that way).
        """
        return self._crypt(sector, data, True)

    def decrypt(self, sector: int, data: bytes | bytearray) -> bytes:
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
        if self._ecb_xts is not None:
            self._ecb_xts.wipe()
        self._wiped = True
