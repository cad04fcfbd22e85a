import threading

import pytest

from qmpd.crypto import pbkdf
from qmpd.crypto.errors import CryptoError
from qmpd.crypto.pbkdf import (
    clear_calibration, iterations_for_time, iterations_per_second,
    master_key_digest_iterations, pbkdf2,
)

RFC6070 = [
    (b"password", b"salt", 1, 20, "0c60c80f961f0e71f3a9b524af6012062fe037a6"),
    (b"password", b"salt", 2, 20, "ea6c014dc72d6f8ccd1ed92ace1d41f0d8de8957"),
    (b"password", b"salt", 4096, 20, "4b007901b765489abead49d926f721d065a429c1"),
    (b"passwordPASSWORDpassword", b"saltSALTsaltSALTsaltSALTsaltSALTsalt", 4096, 25,
     "3d2eec4fe41c849b80c8d83662c0e44a8b291a964cf2f07038"),
    (b"pass\0word", b"sa\0lt", 4096, 16, "56fa6aa75548099dcc37d7f03425e0c3"),
]

SHA256 = [
    (b"password", b"salt", 1, 32,
     "120fb6cffcf8b32c43e7225256c4f837a86548c92ccc35480805987cb70be17b"),
    (b"password", b"salt", 2, 32,
     "ae4d0c95af6b46d32d0adff928f06dd02a303f8ef3c251dfd6e2d85a95474c43"),
    (b"password", b"salt", 4096, 32,
     "c5e478d59288c841aa530db6845c4c8d962893a001ce4e11a4963873aa98134a"),
]


@pytest.mark.parametrize("password,salt,iterations,length,expected", RFC6070)
def test_rfc6070_sha1(password, salt, iterations, length, expected):
    out = pbkdf2("sha1", password, salt, iterations, length)
    assert isinstance(out, bytearray)
    assert out.hex() == expected


@pytest.mark.parametrize("password,salt,iterations,length,expected", SHA256)
def test_known_sha256(password, salt, iterations, length, expected):
    assert pbkdf2("sha256", bytearray(password), salt, iterations, length).hex() == expected


@pytest.mark.parametrize("name", ["md5", "sha224", "sha384", "sha512"])
def test_other_hashes_match_hashlib(name):
    import hashlib
    expected = hashlib.pbkdf2_hmac(name, b"pw", b"s" * 32, 3, 64)
    assert bytes(pbkdf2(name, b"pw", b"s" * 32, 3, 64)) == expected


def test_bad_arguments():
    with pytest.raises(CryptoError, match="Hash algorithm 'md4' not supported"):
        pbkdf2("md4", b"pw", b"salt", 1, 20)
    with pytest.raises(CryptoError, match="must be less than 4294967295"):
        pbkdf2("sha256", b"pw", b"salt", 1 << 32, 20)
    with pytest.raises(CryptoError, match="at least 1"):
        pbkdf2("sha256", b"pw", b"salt", 0, 20)


@pytest.fixture
def fixed_rate(monkeypatch):
    """Pretend the machine does 1,000,000 one-block iterations per second."""
    clear_calibration()
    monkeypatch.setattr(pbkdf, "_measure_iterations_per_second",
                        lambda name: 1_000_000.0)
    yield
    clear_calibration()


def test_scaling_follows_qemu(fixed_rate):
    assert iterations_per_second("sha256", 32) == 1_000_000
    # two sha256 output blocks for a 64-byte key cost twice as much
    assert iterations_per_second("sha256", 64) == 500_000
    assert iterations_for_time("sha256", 2000, 32) == 2_000_000
    assert iterations_for_time("sha256", 10, 64) == 5_000
    assert iterations_for_time("sha1", 10, 64) == 2_500   # 4 sha1 blocks
    # QEMU creates the master-key digest with a 20-byte output, then / 8
    assert master_key_digest_iterations("sha256", 2000) == 250_000


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

    def counting(name):
        calls.append(name)
        return real(name)
    monkeypatch.setattr(pbkdf, "_measure_iterations_per_second", counting)
    results = []
    threads = [threading.Thread(
        target=lambda: results.append(iterations_for_time("sha256", 10, 32)))
        for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == ["sha256"]
    assert len(set(results)) == 1 and results[0] >= 1000
    iterations_for_time("sha256", 20, 64)
    assert calls == ["sha256"]
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
    monkeypatch.setattr(pbkdf, "pbkdf2", lambda *args: bytearray(20))
    assert iterations_for_time("sha256", 1000, 32) >= 1000
    clear_calibration()


def test_unknown_hash_is_not_calibrated():
    with pytest.raises(CryptoError, match="Hash algorithm 'md4' not supported"):
        iterations_for_time("md4", 10, 32)
