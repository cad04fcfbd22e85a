import hashlib
import threading

import pytest
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from qmpd.crypto import pbkdf, pbkdf_blocks
from qmpd.crypto.errors import CryptoError
from qmpd.crypto.hashes import hash_algorithm, hash_supported
from qmpd.crypto.pbkdf import (
    CRYPTOGRAPHY, PYCRYPTODOME, Plan, clear_calibration, derive, iterations_for_time,
    iterations_per_second, master_key_digest_iterations, pbkdf2, plan,
)

RFC6070 = [
    (b"password", b"salt", 1, 20, "0c60c80f961f0e71f3a9b524af6012062fe037a6"),
    (b"password", b"salt", 2, 20, "ea6c014dc72d6f8ccd1ed92ace1d41f0d8de8957"),
    (b"password", b"salt", 4096, 20, "4b007901b765489abead49d926f721d065a429c1"),
    (b"passwordPASSWORDpassword", b"saltSALTsaltSALTsaltSALTsaltSALTsalt", 4096, 25,
     "3d2eec4fe41c849b80c8d83662c0e44a8b291a964cf2f07038"),
    (b"pass\0word", b"sa\0lt", 4096, 16, "56fa6aa75548099dcc37d7f03425e0c3"),
]

# RFC 7914 section 11, the PBKDF2-HMAC-SHA256 test vectors (two blocks each).
RFC7914 = [
    (b"passwd", b"salt", 1, 64,
     "55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc"
     "49ca9cccf179b645991664b39d77ef317c71b845b1e30bd509112041d3a19783"),
    (b"Password", b"NaCl", 80000, 64,
     "4ddcd8f60b98be21830cee5ef22701f9641a4418d04c0414aeff08876b34ab56"
     "a1d425a1225833549adb841b51c9b3176a272bdebba1d078478f62b397f33c8d"),
]

SHA256 = [
    (b"password", b"salt", 1, 32,
     "120fb6cffcf8b32c43e7225256c4f837a86548c92ccc35480805987cb70be17b"),
    (b"password", b"salt", 2, 32,
     "ae4d0c95af6b46d32d0adff928f06dd02a303f8ef3c251dfd6e2d85a95474c43"),
    (b"password", b"salt", 4096, 32,
     "c5e478d59288c841aa530db6845c4c8d962893a001ce4e11a4963873aa98134a"),
]

HASHES = ["md5", "sha1", "sha224", "sha256", "sha384", "sha512", "ripemd160"]
#: Every key length the engine derives: cipher keys, and the 20-byte digest.
LENGTHS = [16, 20, 24, 32, 48, 64]

# Every way a derivation can run. "blocks" uses threads even for one
# iteration (see the parallel fixture), "blocks, 4 threads" more threads
# than a 64-byte sha256 key has blocks.
PATHS = {
    "cryptography": Plan(CRYPTOGRAPHY, 1, 1, 1.0),
    "pycryptodome whole key": Plan(PYCRYPTODOME, 1, 1, 1.0),
    "pycryptodome blocks, 2 threads": Plan(PYCRYPTODOME, 2, 1, 1.0),
    "pycryptodome blocks, 4 threads": Plan(PYCRYPTODOME, 4, 1, 1.0),
}


@pytest.fixture
def parallel(monkeypatch):
    """Blocks run in threads however few the iterations."""
    monkeypatch.setattr(pbkdf, "_PARALLEL_MIN_ITERATIONS", 1)


def _paths_for(hash_name):
    out = []
    for name, how in PATHS.items():
        if how.backend == PYCRYPTODOME and not pbkdf_blocks.available(hash_name):
            continue
        out.append(pytest.param(how, id=name))
    return out


def _reference(hash_name, password, salt, iterations, length):
    """`cryptography`'s PBKDF2HMAC, called directly."""
    kdf = PBKDF2HMAC(algorithm=hash_algorithm(hash_name), length=length, salt=salt,
                     iterations=iterations)
    return kdf.derive(bytes(password))


@pytest.mark.parametrize("how", _paths_for("sha1"))
@pytest.mark.parametrize("password,salt,iterations,length,expected", RFC6070)
def test_rfc6070_sha1(parallel, how, password, salt, iterations, length, expected):
    out = derive(how, "sha1", password, salt, iterations, length)
    assert isinstance(out, bytearray)
    assert out.hex() == expected


@pytest.mark.parametrize("how", _paths_for("sha256"))
@pytest.mark.parametrize("password,salt,iterations,length,expected", RFC7914 + SHA256)
def test_rfc7914_sha256(parallel, how, password, salt, iterations, length, expected):
    assert derive(how, "sha256", bytearray(password), salt, iterations, length).hex() == expected


@pytest.mark.parametrize("password,salt,iterations,length,expected", RFC6070)
def test_rfc6070_through_pbkdf2(password, salt, iterations, length, expected):
    assert pbkdf2("sha1", password, salt, iterations, length).hex() == expected


@pytest.mark.parametrize("password,salt,iterations,length,expected", RFC7914 + SHA256)
def test_rfc7914_through_pbkdf2(password, salt, iterations, length, expected):
    assert pbkdf2("sha256", bytearray(password), salt, iterations, length).hex() == expected


@pytest.mark.parametrize("hash_name", HASHES)
def test_every_hash_and_length_equals_cryptography(parallel, hash_name):
    if not hash_supported(hash_name):
        pytest.skip(f"{hash_name} is not offered by this OpenSSL")
    password = bytearray(b"a passphrase \xff\x00")
    salt = bytes(range(32))
    for how in (p.values[0] for p in _paths_for(hash_name)):
        for length in LENGTHS:
            for iterations in (1, 1000):
                expected = _reference(hash_name, password, salt, iterations, length)
                got = derive(how, hash_name, password, salt, iterations, length)
                assert bytes(got) == expected, (how, length, iterations)


@pytest.mark.parametrize("hash_name", HASHES)
def test_pbkdf2_picks_a_path_that_equals_cryptography(hash_name, monkeypatch):
    if not hash_supported(hash_name):
        pytest.skip(f"{hash_name} is not offered by this OpenSSL")
    for cores in (1, 2, 3):
        monkeypatch.setattr(pbkdf, "cores", lambda cores=cores: cores)
        for length in LENGTHS:
            # enough iterations for the blocks to get threads of their own
            expected = _reference(hash_name, b"pw", b"s" * 32, 5000, length)
            assert bytes(pbkdf2(hash_name, b"pw", b"s" * 32, 5000, length)) == expected


@pytest.mark.parametrize("name", ["md5", "sha224", "sha384", "sha512"])
def test_other_hashes_match_hashlib(name):
    expected = hashlib.pbkdf2_hmac(name, b"pw", b"s" * 32, 3, 64)
    assert bytes(pbkdf2(name, b"pw", b"s" * 32, 3, 64)) == expected


def test_bad_arguments():
    with pytest.raises(CryptoError, match="Hash algorithm 'md4' not supported"):
        pbkdf2("md4", b"pw", b"salt", 1, 20)
    with pytest.raises(CryptoError, match="must be less than 4294967295"):
        pbkdf2("sha256", b"pw", b"salt", 1 << 32, 20)
    with pytest.raises(CryptoError, match="at least 1"):
        pbkdf2("sha256", b"pw", b"salt", 0, 20)
    with pytest.raises(CryptoError, match="at least 1"):
        pbkdf2("sha256", b"pw", b"salt", 1, 0)


# -- which library, how many threads ------------------------------------------------

def test_plan_per_hash_on_two_cores():
    if not pbkdf_blocks.available("sha256"):
        pytest.skip("pycryptodome is not installed")
    # sha256: pycryptodome, the two blocks of a 64-byte key on two threads
    assert plan("sha256", 64, 2) == Plan(PYCRYPTODOME, 2, 1, 1 / 1.27)
    assert plan("sha256", 32, 2) == Plan(PYCRYPTODOME, 1, 1, 1 / 1.27)
    assert plan("sha256", 20, 2).backend == PYCRYPTODOME
    # sha1: cryptography is faster on one block; four blocks on two threads win
    assert plan("sha1", 20, 2).backend == CRYPTOGRAPHY
    assert plan("sha1", 64, 2) == Plan(PYCRYPTODOME, 2, 2, 2 / 0.92)
    assert plan("sha1", 64, 1) == Plan(CRYPTOGRAPHY, 1, 4, 4.0)
    # sha512: a 64-byte key is one block; cryptography is faster
    assert plan("sha512", 64, 2) == Plan(CRYPTOGRAPHY, 1, 1, 1.0)
    assert plan("sha384", 64, 2).backend == PYCRYPTODOME
    assert plan("sha384", 48, 2).backend == CRYPTOGRAPHY
    # pycryptodome has no C loop for RIPEMD-160
    assert not pbkdf_blocks.available("ripemd160")
    assert plan("ripemd160", 64, 2) == Plan(CRYPTOGRAPHY, 1, 4, 4.0)


def test_single_threaded_limits_the_plan(monkeypatch):
    monkeypatch.setattr(pbkdf, "cores", lambda: 2)
    assert plan("sha1", 64).threads == (2 if pbkdf_blocks.available("sha1") else 1)
    with pbkdf.single_threaded():
        assert plan("sha1", 64).threads == 1
        assert plan("sha256", 64).rounds == 2
    assert plan("sha1", 64).threads == (2 if pbkdf_blocks.available("sha1") else 1)


def test_without_pycryptodome_everything_is_cryptography(monkeypatch):
    monkeypatch.setattr(pbkdf_blocks, "available", lambda name: False)
    for name in HASHES:
        for length in LENGTHS:
            assert plan(name, length, 2).backend == CRYPTOGRAPHY
    assert bytes(pbkdf2("sha256", b"pw", b"s", 5000, 64)) == _reference(
        "sha256", b"pw", b"s", 5000, 64)


# -- calibration ---------------------------------------------------------------------

@pytest.fixture
def fixed_rate(monkeypatch):
    """Pretend both libraries do 1,000,000 one-block iterations per second."""
    clear_calibration()
    monkeypatch.setattr(pbkdf, "_measure_iterations_per_second",
                        lambda name, backend, samples=5, start_rate=0.0: 1_000_000.0)
    yield
    clear_calibration()


def test_scaling_follows_qemu_on_one_core(fixed_rate, monkeypatch):
    monkeypatch.setattr(pbkdf, "cores", lambda: 1)
    assert iterations_per_second("sha256", 32) == 1_000_000
    # two sha256 output blocks for a 64-byte key cost twice as much
    assert iterations_per_second("sha256", 64) == 500_000
    assert iterations_for_time("sha256", 2000, 32) == 2_000_000
    assert iterations_for_time("sha256", 10, 64) == 5_000
    assert iterations_for_time("sha1", 10, 64) == 2_500   # 4 sha1 blocks
    # QEMU creates the master-key digest with a 20-byte output, then / 8
    assert master_key_digest_iterations("sha256", 2000) == 250_000


def test_blocks_in_parallel_buy_iterations_not_time(fixed_rate, monkeypatch):
    """iter-time is the wait: the blocks of one thread count, not all blocks."""
    monkeypatch.setattr(pbkdf, "cores", lambda: 2)
    assert iterations_per_second("sha256", 64) == 1_000_000
    assert iterations_for_time("sha256", 1000, 64) == 1_000_000
    assert iterations_for_time("sha1", 1000, 64) == 500_000    # 4 blocks, 2 each
    assert iterations_for_time("sha512", 1000, 64) == 1_000_000
    assert iterations_for_time("ripemd160", 1000, 64) == 250_000   # one thread
    assert master_key_digest_iterations("sha256", 1000) == 125_000


def test_minimums(fixed_rate):
    assert iterations_for_time("sha256", 1, 32) == 1000
    assert iterations_for_time("sha256", 0, 32) == 1000   # qemu-img iter-time=0
    assert master_key_digest_iterations("sha256", 10) == 1250
    assert master_key_digest_iterations("sha256", 1) == 1000


def test_overflow_texts_are_qemus(fixed_rate):
    with pytest.raises(CryptoError) as info:
        iterations_for_time("sha256", 5_000_000, 32)
    assert str(info.value) == ("PBKDF iterations 5000000000 larger than 4294967295: "
                               "Numerical result out of range")
    with pytest.raises(CryptoError) as info:
        iterations_for_time("sha256", -5, 32)
    assert str(info.value) == ("PBKDF iterations 1000000 too large to scale: "
                               "Numerical result out of range")
    # the master-key digest divides by 8 before checking the 32-bit field
    assert master_key_digest_iterations("sha256", 5_000_000) == 625_000_000


def test_calibration_measures_once_per_hash_across_threads(monkeypatch):
    clear_calibration()
    calls = []
    real = pbkdf._measure_iterations_per_second

    def counting(name, backend, samples=5, start_rate=0.0):
        calls.append((name, backend))
        return real(name, backend, samples, start_rate)
    monkeypatch.setattr(pbkdf, "_measure_iterations_per_second", counting)
    results = []
    threads = [threading.Thread(
        target=lambda: results.append(iterations_for_time("sha256", 10, 32)))
        for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == [("sha256", plan("sha256", 32).backend)]
    assert len(set(results)) == 1 and results[0] >= 1000
    iterations_for_time("sha256", 20, 64)
    assert len(calls) == 1
    clear_calibration()


def test_calibration_measures_the_function_that_derives(monkeypatch):
    """Each hash is calibrated with the library its derivations use."""
    clear_calibration()
    measured = []
    real = pbkdf._one_block

    def spy(name, backend, iterations):
        measured.append((name, backend))
        return real(name, backend, iterations)
    monkeypatch.setattr(pbkdf, "_one_block", spy)
    monkeypatch.setattr(pbkdf, "cores", lambda: 2)
    for name, length in (("sha256", 64), ("sha1", 64), ("sha512", 64), ("sha1", 20)):
        measured.clear()
        iterations_for_time(name, 10, length)
        assert measured and set(measured) == {(name, plan(name, length).backend)}
    clear_calibration()


def test_calibration_is_the_best_of_several_samples(monkeypatch):
    """Load only lowers a sample: one fast sample among slow ones decides."""
    clear_calibration()
    elapsed = iter([0.02, 0.04, 0.04, 0.01, 0.04, 0.04, 0.04])
    monkeypatch.setattr(pbkdf, "_sample", lambda name, backend, iterations: next(elapsed))
    rate = pbkdf._measure_iterations_per_second("sha256", PYCRYPTODOME, 5, 1_000_000.0)
    iterations = int(1_000_000 * pbkdf._SAMPLE_SECONDS * 1.25)
    assert rate == pytest.approx(iterations / 0.01)
    assert next(elapsed) == 0.04     # exactly five samples were taken
    clear_calibration()


def test_derivations_count_as_samples(monkeypatch):
    """An open's derivations calibrate: no extra sample for the iterations that follow."""
    clear_calibration()
    monkeypatch.setattr(pbkdf, "cores", lambda: 1)
    backend = plan("sha256", 32).backend
    for _ in range(pbkdf._CALIBRATION_SAMPLES):
        pbkdf._record("sha256", backend, 2_000_000, 0.25)     # 8 M/s
    pbkdf._record("sha256", backend, 1_000_000, 0.2)          # slower: ignored
    pbkdf._record("sha256", backend, 1_000, 0.0001)           # too short: ignored
    monkeypatch.setattr(pbkdf, "_measure_iterations_per_second",
                        lambda *args: pytest.fail("calibrated again"))
    assert iterations_per_second("sha256", 32) == 8_000_000
    pbkdf._record("sha256", backend, 2_250_000, 0.25)         # faster: raises the rate
    assert iterations_per_second("sha256", 32) == 9_000_000
    clear_calibration()


def test_a_real_derivation_is_recorded():
    clear_calibration()
    how = plan("sha256", 32)
    iterations = 200_000
    pbkdf2("sha256", b"pw", b"salt", iterations, 32)
    rate = pbkdf._rates.get(("sha256", how.backend))
    assert rate is not None and rate.samples == 1 and rate.best > 0
    clear_calibration()


def test_real_calibration_is_plausible():
    clear_calibration()
    rate = iterations_per_second("sha256", 32)
    # any machine running this suite does between 10k and 1G per second
    assert 10_000 < rate < 1_000_000_000
    assert iterations_for_time("sha256", 10, 32) >= 1000
    clear_calibration()


def test_calibration_survives_a_frozen_cpu_clock(monkeypatch):
    clear_calibration()
    monkeypatch.setattr(pbkdf.time, "thread_time", lambda: 0.0)
    assert iterations_for_time("sha1", 10, 20) >= 1000
    clear_calibration()


def test_calibration_survives_frozen_clocks(monkeypatch):
    clear_calibration()
    monkeypatch.setattr(pbkdf.time, "thread_time", lambda: 0.0)
    monkeypatch.setattr(pbkdf.time, "perf_counter", lambda: 0.0)
    monkeypatch.setattr(pbkdf, "_one_block", lambda *args: None)
    assert iterations_for_time("sha256", 1000, 32) >= 1000
    clear_calibration()


def test_unknown_hash_is_not_calibrated():
    with pytest.raises(CryptoError, match="Hash algorithm 'md4' not supported"):
        iterations_for_time("md4", 10, 32)
