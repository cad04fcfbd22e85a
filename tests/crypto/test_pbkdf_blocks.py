"""The output blocks of one PBKDF2 on several threads, pycryptodome's
non-public helper and its fallback, and the per-image choice between
blocks in parallel and slots in parallel."""

import threading

import pytest

from qmpd.crypto import pbkdf, pbkdf_blocks
from qmpd.crypto.luks import LuksCreateOptions, MemoryImageIO, open_volume
from qmpd.crypto.luks import volume as volume_module
from qmpd.crypto.luks.header import SLOT_ACTIVE, SLOT_INACTIVE, KeySlot, LuksHeader
from qmpd.crypto.pbkdf import CRYPTOGRAPHY, PYCRYPTODOME, Plan, derive, pbkdf2
from tests.crypto.luks.images import image_bytes

pytestmark = pytest.mark.skipif(not pbkdf_blocks.available("sha256"),
                                reason="pycryptodome is not installed")

HASHES = ["md5", "sha1", "sha224", "sha256", "sha384", "sha512"]


@pytest.fixture(autouse=True)
def fresh_checks():
    pbkdf_blocks.forget()
    yield
    pbkdf_blocks.forget()


def test_the_tested_pycryptodome_is_installed():
    """pyproject.toml pins the versions the helper was checked with."""
    from importlib.metadata import version
    major, minor = (int(part) for part in version("pycryptodome").split(".")[:2])
    assert (3, 20) <= (major, minor) <= (4, 4)


@pytest.mark.parametrize("hash_name", HASHES)
def test_each_block_alone_is_the_public_pbkdf2s(hash_name):
    block = pbkdf_blocks.block_function(hash_name)
    assert block is not None
    size = pbkdf.hash_digest_size(hash_name)
    whole = pbkdf_blocks.whole_key(hash_name, b"pw", b"salt", 7, 4 * size)
    for index in range(1, 5):
        assert block(bytearray(b"pw"), b"salt", 7, index) == whole[(index - 1) * size:index * size]


def test_the_helper_is_checked_once_per_hash(monkeypatch):
    calls = []
    real = pbkdf_blocks._self_test
    monkeypatch.setattr(pbkdf_blocks, "_self_test",
                        lambda name, block: calls.append(name) or real(name, block))
    for _ in range(3):
        assert pbkdf_blocks.block_function("sha256") is not None
    assert pbkdf_blocks.block_function("ripemd160") is None
    assert calls == ["sha256"]


@pytest.mark.parametrize("breakage", ["missing", "raises", "wrong answer"])
def test_a_changed_helper_falls_back_to_the_public_call(monkeypatch, breakage):
    from Crypto.Hash import HMAC

    if breakage == "missing":
        monkeypatch.delattr(HMAC.HMAC, "_pbkdf2_hmac_assist")
    elif breakage == "raises":
        def broken(self, first, iterations):
            raise TypeError("a new signature")
        monkeypatch.setattr(HMAC.HMAC, "_pbkdf2_hmac_assist", broken)
    else:   # e.g. a helper that no longer appends INT(i) the same way
        real = pbkdf_blocks._make_block_function
        monkeypatch.setattr(pbkdf_blocks, "_make_block_function",
                            lambda module: lambda pw, salt, n, index: real(module)(pw, salt, n, 1))
    assert pbkdf_blocks.block_function("sha256") is None
    monkeypatch.undo()          # the public PBKDF2 needs the real helper
    pbkdf_blocks.forget()
    monkeypatch.setattr(pbkdf_blocks, "block_function", lambda name: None)
    monkeypatch.setattr(pbkdf, "cores", lambda: 2)
    # the plan is one thread, the whole key in the public call
    assert pbkdf.plan("sha256", 64) == Plan(PYCRYPTODOME, 1, 2, 2 / 1.27)
    assert pbkdf.plan("sha1", 64).backend == CRYPTOGRAPHY
    import hashlib
    assert bytes(pbkdf2("sha256", b"pw", b"s" * 32, 5000, 64)) == hashlib.pbkdf2_hmac(
        "sha256", b"pw", b"s" * 32, 5000, 64)
    # and a plan asking for threads still gets the right bytes
    assert bytes(derive(Plan(PYCRYPTODOME, 2, 1, 1.0), "sha256", b"pw", b"s", 5000, 64)) == \
        hashlib.pbkdf2_hmac("sha256", b"pw", b"s", 5000, 64)


def _spy_blocks(monkeypatch, hash_name):
    """Record (thread, block index) of every block computed."""
    seen = []
    real = pbkdf_blocks.block_function(hash_name)

    def block(password, salt, iterations, index):
        seen.append((threading.get_ident(), index))
        return real(password, salt, iterations, index)
    monkeypatch.setattr(pbkdf_blocks, "block_function", lambda name: block)
    return seen


def test_the_blocks_of_a_64_byte_key_run_on_two_threads(monkeypatch):
    monkeypatch.setattr(pbkdf, "cores", lambda: 2)
    seen = _spy_blocks(monkeypatch, "sha256")
    pbkdf2("sha256", b"pw", b"salt", 5000, 64)
    assert sorted(index for _, index in seen) == [1, 2]
    assert len({thread for thread, _ in seen}) == 2
    assert threading.get_ident() in {thread for thread, _ in seen}   # the caller takes one


def test_four_sha1_blocks_on_two_threads_two_each(monkeypatch):
    monkeypatch.setattr(pbkdf, "cores", lambda: 2)
    seen = _spy_blocks(monkeypatch, "sha1")
    pbkdf2("sha1", b"pw", b"salt", 5000, 64)
    by_thread = {}
    for thread, index in seen:
        by_thread.setdefault(thread, []).append(index)
    assert sorted(by_thread.values()) == [[1, 3], [2, 4]]


def test_few_iterations_stay_on_the_calling_thread(monkeypatch):
    monkeypatch.setattr(pbkdf, "cores", lambda: 2)
    seen = _spy_blocks(monkeypatch, "sha256")
    pbkdf2("sha256", b"pw", b"salt", 1000, 64)     # the master-key digest minimum
    assert {thread for thread, _ in seen} == {threading.get_ident()}


def test_one_core_or_a_race_means_one_thread(monkeypatch):
    seen = _spy_blocks(monkeypatch, "sha256")
    monkeypatch.setattr(pbkdf, "cores", lambda: 1)
    pbkdf2("sha256", b"pw", b"salt", 5000, 64)
    monkeypatch.setattr(pbkdf, "cores", lambda: 2)
    with pbkdf.single_threaded():
        pbkdf2("sha256", b"pw", b"salt", 5000, 64)
    assert seen == []         # the public whole-key call, no block of ours


def test_a_failing_block_raises_in_the_caller_after_the_others_end(monkeypatch):
    monkeypatch.setattr(pbkdf, "cores", lambda: 2)
    real = pbkdf_blocks.block_function("sha256")
    finished = []

    def block(password, salt, iterations, index):
        if index == 2:
            raise MemoryError("no room")
        value = real(password, salt, iterations, index)
        finished.append(index)
        return value
    monkeypatch.setattr(pbkdf_blocks, "block_function", lambda name: block)
    with pytest.raises(MemoryError):
        pbkdf2("sha256", b"pw", b"salt", 5000, 64)
    assert finished == [1]
    assert not [t for t in threading.enumerate() if t.name == "pbkdf2-block"]


def test_blocks_release_the_gil():
    """Two threads' blocks take far less than twice one block's CPU-bound wall time
    could if they held the GIL: a Python thread keeps running meanwhile."""
    counter = [0]
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            counter[0] += 1
    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        pbkdf_blocks.block_function("sha256")(b"pw", b"salt", 300_000, 1)
    finally:
        stop.set()
        spinner.join()
    assert counter[0] > 1000


# -- blocks in parallel or slots in parallel ------------------------------------------

def _header(hash_name: str, key_bytes: int, slot_iterations: list[int], digest: int) -> LuksHeader:
    slots = [KeySlot(SLOT_ACTIVE, n, bytes(32), 8 + 256 * i, 4000)
             for i, n in enumerate(slot_iterations)]
    slots += [KeySlot(SLOT_INACTIVE, 0, bytes(32), 8 + 256 * i, 4000)
              for i in range(len(slots), 8)]
    return LuksHeader(b"LUKS\xba\xbe", 1, b"aes", b"xts-plain64", hash_name.encode(), 4096,
                      key_bytes, bytes(20), bytes(32), digest, bytes(40), tuple(slots))


@pytest.mark.parametrize("hash_name,key_bytes,slots,race", [
    # one sha256 block per key: the blocks cannot use the second core, slots can
    ("sha256", 32, 4, True),
    ("sha256", 32, 2, True),
    # two blocks: in order wins on the mean wait (and answers slot 0 in half the time)
    ("sha256", 64, 4, False),
    ("sha256", 64, 2, False),
    ("sha256", 64, 3, False),
    # four sha1 blocks, two per thread either way: with 4 slots cryptography's
    # faster one-thread loop and the digests side by side tip it to the race
    ("sha1", 64, 4, True),
    ("sha1", 64, 2, False),
    # sha512: one block, cryptography: race
    ("sha512", 64, 4, True),
    # three sha224 blocks: two rounds in order against three in a race
    ("sha224", 64, 4, True),
])
def test_per_image_choice_on_two_cores(hash_name, key_bytes, slots, race):
    # qemu-img's proportions: slot iterations for the key, digest for 20 bytes / 8
    blocks = -(-key_bytes // pbkdf.hash_digest_size(hash_name))
    header = _header(hash_name, key_bytes, [800_000] * slots, 800_000 * blocks // 8)
    assert volume_module.race_is_faster(header, list(range(slots)), 2) is race


def test_answer_times():
    assert volume_module._answer_times([1.0, 1.0, 1.0, 1.0], 2) == [1.0, 1.0, 2.0, 2.0]
    assert volume_module._answer_times([1.0, 1.0, 1.0], 1) == [1.0, 2.0, 3.0]
    # a slot answers only once every earlier slot has
    assert volume_module._answer_times([3.0, 1.0, 1.0], 2) == [3.0, 3.0, 3.0]


@pytest.mark.parametrize("race", [True, False])
@pytest.mark.parametrize("cipher_mode,hash_alg", [("xts", "sha256"), ("xts", "sha1"),
                                                  ("cbc", "sha256")])
def test_both_strategies_open_the_right_slot(monkeypatch, race, cipher_mode, hash_alg):
    monkeypatch.setattr(pbkdf, "cores", lambda: 2)
    monkeypatch.setattr(pbkdf, "_PARALLEL_MIN_ITERATIONS", 1)
    monkeypatch.setattr(volume_module, "race_is_faster", lambda *args: race)
    options = LuksCreateOptions(iter_time=1, cipher_mode=cipher_mode, hash_alg=hash_alg,
                                ivgen_alg="essiv" if cipher_mode == "cbc" else None)
    data = image_bytes(((0, b"zero"), (1, b"one"), (2, b"two"), (3, b"three")), options)
    keys = set()
    for index, passphrase in enumerate((b"zero", b"one", b"two", b"three")):
        with open_volume(MemoryImageIO(data), passphrase) as volume:
            assert volume.witness.slot_index == index
            keys.add(bytes(volume.volume_key))
    assert len(keys) == 1
    with pytest.raises(Exception, match="Invalid password"):
        open_volume(MemoryImageIO(data), b"wrong")


def test_no_thread_to_be_had_means_the_caller_computes_every_block(monkeypatch):
    import hashlib

    monkeypatch.setattr(pbkdf, "cores", lambda: 2)

    def refuse(self):
        raise RuntimeError("can't start new thread")
    monkeypatch.setattr(threading.Thread, "start", refuse)
    assert bytes(pbkdf2("sha1", b"pw", b"salt", 5000, 64)) == hashlib.pbkdf2_hmac(
        "sha1", b"pw", b"salt", 5000, 64)
