"""Reading a LUKS1 volume: header checks, unlocking, and the open volume.

Reading follows QEMU 7.2's qcrypto_block_luks_open: the structural checks
(:func:`header.check_header`), then the cipher, hash and IV generator names,
then every active slot in order until one opens. On top of QEMU, an image
whose payload would start past the end of the file is refused (QEMU only
notices later, as a negative size).

An open :class:`LuksVolume` keeps the volume key (a bytearray, wiped by
:meth:`LuksVolume.close`) and a :class:`PassphraseWitness` instead of the
passphrase: enough to recognise, later, that a passphrase is the one that
opened the volume, without keeping it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import queue
import threading
from typing import Callable

from qmpd.crypto import ciphers, hashes, pbkdf
from qmpd.crypto.ciphers import CipherSpec, SectorCipher
from qmpd.crypto.errors import CryptoError
from qmpd.crypto.luks.header import (
    DIGEST_LEN,
    HEADER_SIZE,
    NUM_KEY_SLOTS,
    SECTOR_SIZE,
    LuksHeader,
    check_header,
    slot_entry_offset,
)
from qmpd.crypto.luks.io import ImageIO
from qmpd.crypto.luks.keyslot import read_material, try_slot, wipe
from qmpd.crypto.luks.luks2_volume import (
    PROBE_LENGTH,
    Luks2Volume,
    open_luks2_volume,
    probe_version,
)
from qmpd.crypto.luks.unlocked import UnlockedVolume


def parse_header_bytes(
    raw: bytes, *, detached_header: bool = False
) -> tuple[LuksHeader, CipherSpec]:
    """Header and cipher from the image's first bytes, or CryptoError.

    A short image reads as zero-padded, as a block device read past its end
    does in QEMU, so a truncated header fails a check, not a parser.
    ``detached_header``: see :func:`~.header.check_header`.
    """
    raw = bytes(raw[:HEADER_SIZE]).ljust(HEADER_SIZE, b"\0")
    header = LuksHeader.unpack(raw)
    check_header(header, detached_header=detached_header)
    spec = ciphers.parse_luks_cipher(
        header.cipher_name_str, header.cipher_mode_str, header.key_bytes
    )
    hashes.hash_algorithm(header.hash_spec_str)
    ciphers.check_cipher_supported(spec)
    return header, spec


def check_payload_in_file(header: LuksHeader, image_size: int) -> None:
    if header.payload_offset_bytes > image_size:
        raise CryptoError(
            f"LUKS payload offset {header.payload_offset_bytes} is beyond the end "
            f"of the image ({image_size} bytes)"
        )


def _read_checked(
    io: ImageIO, payload_in_file: bool, detached_header: bool = False
) -> tuple[LuksHeader, CipherSpec]:
    header, spec = parse_header_bytes(io.read(0, HEADER_SIZE), detached_header=detached_header)
    if payload_in_file and not detached_header:
        check_payload_in_file(header, io.size())
    return header, spec


def read_header(
    io: ImageIO, *, payload_in_file: bool = True, detached_header: bool = False
) -> LuksHeader:
    """The image's LUKS header, checked like QEMU does on open.

    ``payload_in_file=False`` is for LUKS inside qcow2, whose payload lives
    in the qcow2 clusters rather than after the header; ``detached_header``
    for a header image of its own (the payload on another image).
    """
    return _read_checked(io, payload_in_file, detached_header)[0]


class PassphraseWitness:
    """Proof material that a passphrase opened a given slot, without the passphrase.

    Holds an HMAC of the passphrase under a random per-volume key, the index
    of the slot it opened, and a SHA-256 of everything that slot's result
    depends on (the header's fixed part and the slot's entry and key
    material). If a later passphrase has the same HMAC and those bytes on
    disk are unchanged, it provably opens the same slot to the same volume
    key, so the PBKDF2 work need not be repeated.
    """

    def __init__(self, passphrase: bytes | bytearray, slot_index: int, slot_digest: bytes) -> None:
        self._key = bytearray(os.urandom(32))
        self._mac = self._tag(passphrase)
        self.slot_index = slot_index
        self._slot_digest = slot_digest

    def _tag(self, passphrase: bytes | bytearray) -> bytes:
        return hmac.new(bytes(self._key), bytes(passphrase), "sha256").digest()

    def proves(self, passphrase: bytes | bytearray, slot_digest: bytes) -> bool:
        if not self._key:
            return False
        return hmac.compare_digest(self._tag(passphrase), self._mac) and hmac.compare_digest(
            slot_digest, self._slot_digest
        )

    def wipe(self) -> None:
        wipe(self._key)
        self._key = bytearray()
        self._mac = b""

    def __repr__(self) -> str:
        return f"PassphraseWitness(slot={self.slot_index})"


def slot_state_digest(header: LuksHeader, index: int, material: bytes) -> bytes:
    """SHA-256 of what unlocking slot ``index`` depends on."""
    packed = header.pack()
    digest = hashlib.sha256()
    digest.update(packed[: slot_entry_offset(0)])
    digest.update(packed[slot_entry_offset(index) : slot_entry_offset(index + 1)])
    digest.update(material)
    return digest.digest()


class LuksVolume(UnlockedVolume):
    """An unlocked LUKS1 volume: header view, payload cipher, volume key.

    ``header`` is the header as last read or written by this engine
    (:func:`~qmpd.crypto.luks.amend.apply_amend` replaces it).
    """

    def __init__(
        self,
        header: LuksHeader,
        spec: CipherSpec,
        volume_key: bytearray,
        witness: PassphraseWitness | None,
        *,
        payload_in_file: bool = True,
        detached_header: bool = False,
    ) -> None:
        self.header = header
        #: The header is an image of its own: the payload offset is where
        #: the data starts on the other image (QEMU 9.0's detached header).
        self.detached_header = detached_header
        self.payload_in_file = payload_in_file and not detached_header
        self.spec = spec
        self.hash_name = header.hash_spec_str
        self.payload_offset = header.payload_offset_bytes
        self._volume_key = volume_key
        self.cipher = SectorCipher(spec, volume_key)
        self.witness = witness

    def info(self) -> dict:
        """QCryptoBlockInfoLUKS, as query-named-block-nodes shows it (QEMU 7.2)."""
        out = self._info_head(self.header.mk_digest_iterations, self.header.uuid_str)
        slots = []
        for slot in self.header.slots:
            entry: dict = {"active": slot.is_active}
            if slot.is_active:
                entry["iters"] = slot.iterations
                entry["stripes"] = slot.stripes
            entry["key-offset"] = slot.key_offset * SECTOR_SIZE
            slots.append(entry)
        out["slots"] = slots
        return out

    def close(self) -> None:
        """Wipe the volume key and everything derived from a passphrase."""
        super().close()
        if self.witness is not None:
            self.witness.wipe()

    def __repr__(self) -> str:
        state = "closed" if not self._volume_key else "open"
        return f"LuksVolume({state}, {self.header!r})"


def find_key(
    io: ImageIO, header: LuksHeader, spec: CipherSpec, passphrase: bytes | bytearray
) -> tuple[bytearray, int, bytes]:
    """QEMU's find_key: (volume key, slot index, slot digest) of the first slot that opens.

    QEMU tries the active slots one after another. PBKDF2 releases the GIL,
    so with more than one core either the output blocks of each slot's key
    run in parallel (pbkdf does that by itself) while slots are tried in
    order, or several slots are tried at once, one thread each, and the
    answer is still the lowest slot that opens; :func:`race_is_faster`
    picks per image. Either way a passphrase in a later slot, or a wrong
    one, costs a fraction of QEMU's wait. Slots of very unequal cost (a
    hostile header claiming billions of iterations) are tried in order, as
    QEMU does, so work the answer does not need is never started.
    """
    hash_name = header.hash_spec_str
    active = [i for i in range(NUM_KEY_SLOTS) if header.slots[i].is_active]
    materials = {i: read_material(io, header, i) for i in active}

    def attempt(index: int) -> bytearray | None:
        return try_slot(header, spec, hash_name, index, passphrase, materials[index])

    iterations = [header.slots[i].iterations for i in active]
    workers = min(len(active), pbkdf.cores())
    if (
        workers > 1
        and max(iterations) <= 2 * max(1, min(iterations))
        and race_is_faster(header, active, pbkdf.cores())
    ):
        race = _SlotRace(attempt, active, workers)
        outcome = race.result
    else:
        race = None
        outcome = attempt
    try:
        for index in active:
            key = outcome(index)
            if key is not None:
                return key, index, slot_state_digest(header, index, materials[index])
        raise CryptoError("Invalid password, cannot unlock any keyslot")
    finally:
        if race is not None:
            race.finish()


def _answer_times(costs: list[float], workers: int) -> list[float]:
    """When the answer for each slot is known, slots taken in order by
    ``workers`` threads: slot k answers once slots 0..k are done."""
    free = [0.0] * workers
    done = []
    for cost in costs:
        worker = free.index(min(free))
        free[worker] += cost
        done.append(free[worker])
    answers, latest = [], 0.0
    for end in done:
        latest = max(latest, end)
        answers.append(latest)
    return answers


def race_is_faster(header: LuksHeader, active: list[int], cores: int) -> bool:
    """Slots in parallel (one thread each) rather than in order (each key's blocks in parallel)?

    Estimated from the header: a slot costs its key's PBKDF2 plus the
    master-key digest's, per iteration as :func:`pbkdf.plan` rates them for
    one thread (race) or every core (in order). The answer compared is the
    mean wait over the outcomes "slot k opens", for each active slot, and
    "no slot opens" (a wrong passphrase, as slow as the last slot); a tie
    keeps the order, which answers early slots soonest and wastes nothing.
    With two cores: a 32-byte SHA-256 key (one block) races; a 64-byte one
    (two blocks) goes in order: by the estimate about 10% slower than the
    race when the passphrase is in the last of 4 slots, and in 55% of the
    race's time when it is in the first.
    """
    hash_name = header.hash_spec_str
    digest = header.mk_digest_iterations

    def costs(threads: int) -> list[float]:
        key_cost = pbkdf.plan(hash_name, header.key_bytes, threads).cost
        digest_cost = pbkdf.plan(hash_name, DIGEST_LEN, threads).cost
        return [header.slots[i].iterations * key_cost + digest * digest_cost for i in active]

    workers = min(len(active), cores)
    in_order = _answer_times(costs(cores), 1)
    raced = _answer_times(costs(1), workers)
    mean_in_order = (sum(in_order) + in_order[-1]) / (len(active) + 1)
    mean_raced = (sum(raced) + raced[-1]) / (len(active) + 1)
    return mean_raced < mean_in_order


class _SlotRace:
    """Slots tried by a few daemon threads; results read back in slot order.

    Daemon threads: an exit never waits for a try nobody needs any more.
    Every volume key found but not handed out is wiped.
    """

    def __init__(
        self, attempt: Callable[[int], bytearray | None], slots: list[int], workers: int
    ) -> None:
        self._lock = threading.Lock()
        self._todo = list(slots)
        self._finished = False
        self._results: dict[int, queue.SimpleQueue] = {i: queue.SimpleQueue() for i in slots}
        for _ in range(workers):
            threading.Thread(
                target=self._work, args=(attempt,), daemon=True, name="luks-slot"
            ).start()

    def _work(self, attempt: Callable[[int], bytearray | None]) -> None:
        while True:
            with self._lock:
                if self._finished or not self._todo:
                    return
                index = self._todo.pop(0)
            outcome: tuple[bytearray | None, BaseException | None]
            try:
                with pbkdf.single_threaded():  # the race already fills the cores
                    outcome = (attempt(index), None)
            except BaseException as exc:  # handed to the reader of this slot
                outcome = (None, exc)
            with self._lock:
                if self._finished:
                    wipe(outcome[0])
                    continue
                self._results[index].put(outcome)

    def result(self, index: int) -> bytearray | None:
        key, exc = self._results[index].get()
        if exc is not None:
            raise exc
        return key

    def finish(self) -> None:
        with self._lock:
            self._finished = True
            for results in self._results.values():
                while not results.empty():
                    wipe(results.get()[0])


def open_volume(
    io: ImageIO,
    passphrase: bytes | bytearray,
    *,
    payload_in_file: bool = True,
    luks2: bool = False,
    detached_header: bool = False,
) -> "LuksVolume | Luks2Volume":
    """Check the header and unlock the volume key with ``passphrase``.

    ``luks2=True`` also opens a LUKS2 image, as a
    :class:`~.luks2_volume.Luks2Volume` (its payload elsewhere, as a detached
    header's, when not ``payload_in_file``: qcow2's clusters); otherwise, as
    in QEMU, version 2 fails the header check ("LUKS version 2 is not
    supported"). ``detached_header``: ``io`` is a header image of its own
    (QEMU 9.0's luks ``header``); a LUKS1 header then skips the payload
    overlap checks, and the payload offset it records applies to the other
    image.
    """
    if luks2 and probe_version(io.read(0, PROBE_LENGTH)) == 2:
        return open_luks2_volume(
            io, passphrase, detached_header=detached_header or not payload_in_file
        )
    header, spec = _read_checked(io, payload_in_file, detached_header)
    key, index, digest = find_key(io, header, spec, passphrase)
    return LuksVolume(
        header,
        spec,
        key,
        PassphraseWitness(passphrase, index, digest),
        payload_in_file=payload_in_file,
        detached_header=detached_header,
    )
