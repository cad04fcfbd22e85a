"""Both Argon2 builds (the system's libargon2, argon2-cffi's copy) give the
same bytes, and the same as an independent implementation (OpenSSL's
Argon2id through `cryptography`)."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings, strategies as st

from qmpd.crypto import argon2_kdf
from tests.oracles import IN_CI

BUILDS = argon2_kdf.builds()


def derive(build: str, kind: str, t: int, m: int, p: int, pw: bytes, salt: bytes) -> bytes:
    ffi, lib = BUILDS[build]
    out = bytearray(32)
    assert argon2_kdf.hash_with(ffi, lib, kind, t, m, p, pw, salt, out) == argon2_kdf.ARGON2_OK
    return bytes(out)


def test_the_system_build_is_there_where_cryptsetup_is():
    """Debian's cryptsetup links libargon2: in CI (cryptsetup installed) the
    faster system build must be the one in use."""
    if not IN_CI and "system" not in BUILDS:
        pytest.skip("no libargon2.so.1 on this machine")
    assert "system" in BUILDS
    assert argon2_kdf.BACKEND == ("bundled" if os.environ.get("QMPD_ARGON2") else "system")


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(kind=st.sampled_from(["argon2i", "argon2id"]), t=st.integers(1, 3),
       m=st.sampled_from([8, 32, 64]), p=st.integers(1, 4), pw=st.binary(max_size=40),
       salt=st.binary(min_size=8, max_size=40))
def test_builds_agree(kind, t, m, p, pw, salt):
    m = max(m, 8 * p)
    results = {derive(name, kind, t, m, p, pw, salt) for name in BUILDS}
    assert len(results) == 1


def test_matches_openssl_argon2id():
    from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

    pw, salt = b"correct horse", b"0123456789abcdef"
    expected = Argon2id(salt=salt, length=32, iterations=3, lanes=2, memory_cost=64).derive(pw)
    for name in BUILDS:
        assert derive(name, "argon2id", 3, 64, 2, pw, salt) == expected, name


def test_error_code_has_a_text():
    out = bytearray(32)
    code = argon2_kdf.derive_into("argon2id", 0, 64, 1, b"pw", b"saltsalt", out)   # t = 0
    assert code != argon2_kdf.ARGON2_OK
    assert argon2_kdf.error_message(code) == "Time cost is too small"
