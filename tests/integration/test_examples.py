"""The examples run as documented against a real daemon."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from qmpd.crypto.luks import MemoryImageIO, open_volume
from tests.integration.test_cli_blockdev import make_luks_image, query_nodes

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_rotate_key_example(qmpd_daemon, tmp_path):
    image = tmp_path / "disk.luks"
    make_luks_image(image, b"old pass")
    sock, _ = qmpd_daemon("--object", "secret,id=old,data=old pass",
                          "--blockdev", f"driver=luks,node-name=disk,key-secret=old,"
                                        f"file.driver=file,file.filename={image}")
    new_pw = tmp_path / "new.txt"
    new_pw.write_text("new pass\n")
    out = subprocess.run([sys.executable, str(EXAMPLES / "rotate_key.py"), sock, "disk",
                          "--old-secret", "old", "--new-passphrase-file", str(new_pw),
                          "--iter-time", "10"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "new passphrase added, old one erased" in out.stdout
    slots = next(n for n in query_nodes(sock) if n["node-name"] == "disk")[
        "image"]["format-specific"]["data"]["slots"]
    assert [s["active"] for s in slots] == [False, True] + [False] * 6
    io = MemoryImageIO(image.read_bytes())
    open_volume(io, b"new pass").close()


def test_quickstart_rotates_a_key_and_exits_0():
    out = subprocess.run([sys.executable, str(EXAMPLES / "quickstart.py")],
                         env={**os.environ, "QMPD_DEMO_ITER_TIME": "10"},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "slot 0: inactive" in out.stdout and "slot 1: active" in out.stdout
    assert "Invalid password, cannot unlock any keyslot" in out.stdout
    assert "qmpd exited with 0; socket removed: True" in out.stdout


def test_rotate_key_example_on_a_cryptsetup_luks2_image(qmpd_daemon, tmp_path):
    """The README's LUKS2 example: cryptsetup's default format, keys rotated
    online with argon2id, and cryptsetup agrees afterwards."""
    from tests.oracles import cryptsetup_unlocks, cryptsetup_volume_key, require, run

    require("cryptsetup")
    image = tmp_path / "disk.luks2"
    with open(image, "wb") as f:
        f.truncate(20 << 20)
    run(["cryptsetup", "luksFormat", "--type", "luks2", "--batch-mode", "--key-file", "-",
         "--pbkdf", "argon2id", "--pbkdf-memory", "1024", "--pbkdf-force-iterations", "4",
         "--pbkdf-parallel", "1", str(image)], input=b"old pass")
    key = cryptsetup_volume_key(str(image), b"old pass")
    sock, _ = qmpd_daemon("--object", "secret,id=old,data=old pass",
                          "--blockdev", f"driver=luks,node-name=disk,key-secret=old,"
                                        f"file.driver=file,file.filename={image}")
    new_pw = tmp_path / "new.txt"
    new_pw.write_text("new pass\n")
    out = subprocess.run([sys.executable, str(EXAMPLES / "rotate_key.py"), sock, "disk",
                          "--old-secret", "old", "--new-passphrase-file", str(new_pw),
                          "--iter-time", "10", "--pbkdf", "argon2id", "--pbkdf-memory", "1024",
                          "--pbkdf-parallel", "1"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    slots = next(n for n in query_nodes(sock) if n["node-name"] == "disk")[
        "image"]["format-specific"]["data"]["slots"]
    assert [(s["keyslot"], s["pbkdf"], s["pbkdf-memory"]) for s in slots] == [
        (1, "argon2id", 1024)]
    assert not cryptsetup_unlocks(str(image), b"old pass")
    assert cryptsetup_volume_key(str(image), b"new pass") == key
