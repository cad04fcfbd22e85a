"""Small LUKS images built in memory by this engine, for the engine's tests.

Low iteration counts (iter-time 1 ms, so QEMU's minimum of 1000 or a few
thousand) keep every unlock to a few milliseconds.
"""

from __future__ import annotations

from qmpd.crypto.luks import (
    LuksAmendOptions, LuksCreateOptions, MemoryImageIO, apply_amend, create_volume,
    open_volume, prepare_amend)

FAST = 1   # iter-time in ms


def add_key(io, volume, new: bytes, *, unlock: bytes, keyslot: int | None = None,
            force: bool = False) -> None:
    plan = prepare_amend(volume, io, LuksAmendOptions(
        "active", new_secret=new, keyslot=keyslot, iter_time=FAST, secret=unlock,
        force=force))
    apply_amend(plan, io)


_cache: dict[tuple, bytes] = {}


def image_bytes(passphrases: tuple[tuple[int, bytes], ...],
                options: LuksCreateOptions | None = None) -> bytes:
    """An image whose slot i holds passphrase p for each (i, p), slot order as given.

    The first pair must be slot 0 (the one create fills). Cached per arguments.
    """
    options = options or LuksCreateOptions(iter_time=FAST)
    key = (passphrases, repr(options))
    if key not in _cache:
        _cache[key] = _build(passphrases, options)
    return _cache[key]


def _build(passphrases, options) -> bytes:
    io = MemoryImageIO()
    first_slot, first = passphrases[0]
    assert first_slot == 0
    volume = create_volume(io, first, options)
    for slot, passphrase in passphrases[1:]:
        add_key(io, volume, passphrase, unlock=first, keyslot=slot)
    volume.close()
    return bytes(io.data)


def volume_key_of(data: bytes, passphrase: bytes) -> bytes:
    volume = open_volume(MemoryImageIO(data), passphrase)
    try:
        return bytes(volume.volume_key)
    finally:
        volume.close()
