"""What an unlocked LUKS volume of either version offers the block layer.

:class:`UnlockedVolume` holds the volume key and the payload cipher and
wipes both on close; LuksVolume (LUKS1, volume.py) and Luks2Volume
(luks2_volume.py) add their header and their ``info()``, whose first members
(:meth:`UnlockedVolume._info_head`) are the same QEMU QCryptoBlockInfoLUKS
fields for both.
"""

from __future__ import annotations

from qmpd.crypto.ciphers import CipherSpec, SectorCipher
from qmpd.crypto.errors import CryptoError
from qmpd.crypto.secrets import wipe


class UnlockedVolume:
    spec: CipherSpec
    cipher: SectorCipher
    hash_name: str
    payload_offset: int
    _volume_key: bytearray

    @property
    def volume_key(self) -> bytearray:
        """The volume key itself (for the engine; never log or return it)."""
        if not self._volume_key:
            raise CryptoError("The LUKS volume is closed")
        return self._volume_key

    def _info_head(self, master_key_iters: int, uuid: str) -> dict:
        """QCryptoBlockInfoLUKS up to the slots, in QEMU's member order."""
        spec = self.spec
        out: dict = {
            "cipher-alg": spec.cipher_alg,
            "cipher-mode": spec.cipher_mode,
            "ivgen-alg": spec.ivgen_alg,
        }
        if spec.ivgen_alg == "essiv" and spec.ivgen_hash_alg:
            out["ivgen-hash-alg"] = spec.ivgen_hash_alg
        out.update(
            {
                "hash-alg": self.hash_name,
                "payload-offset": self.payload_offset,
                "master-key-iters": master_key_iters,
                "uuid": uuid,
            }
        )
        return out

    def close(self) -> None:
        """Wipe the volume key and the cipher's copy of it."""
        self.cipher.wipe()
        wipe(self._volume_key)
        self._volume_key = bytearray()

    def __enter__(self) -> UnlockedVolume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
