"""The reference tools (qemu-img, qemu-io, cryptsetup, qemu-storage-daemon).

Interop tests call :func:`require` for each tool they use: without the tool
the test is skipped on a developer machine, but fails in CI (CI=true), where
.ci/run installs every oracle.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        message = f"reference tool {tool!r} is not installed"
        if IN_CI:
            pytest.fail(message + " (CI=true: a missing oracle is a failure)")
        pytest.skip(message)
    return path


def run(args: list[str], *, input: bytes | None = None, check: bool = True,
        timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a reference tool; on failure show what it printed."""
    proc = subprocess.run(args, input=input, capture_output=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{args[0]} exited {proc.returncode}: {proc.stderr.decode(errors='replace')}"
            f"{proc.stdout.decode(errors='replace')}")
    return proc


def run_qemu_img(args: list[str], *, retries: int = 20, **kw) -> subprocess.CompletedProcess:
    """qemu-img, retried when QEMU 7.2's PBKDF2 calibration flakes.

    QEMU sometimes fails with "Unable to get accurate CPU usage" on a busy
    machine; that is QEMU's bug, not the test's subject.
    """
    require("qemu-img")
    for attempt in range(retries):
        proc = run(["qemu-img", *args], check=False, **kw)
        if proc.returncode == 0:
            return proc
        if b"Unable to get accurate CPU usage" not in proc.stderr:
            break
        time.sleep(min(0.1 * (attempt + 1), 1.0))
    raise AssertionError(f"qemu-img {' '.join(args)} failed: {proc.stderr.decode(errors='replace')}")


def qemu_img_create_luks(path: str, passphrase: str, size: str = "16M",
                         iter_time: int = 10, fmt: str = "luks", extra: str = "") -> None:
    """Make a LUKS image (raw luks, or qcow2 with LUKS inside) with qemu-img."""
    if fmt == "luks":
        opts = f"key-secret=s0,iter-time={iter_time}"
    else:
        opts = f"encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time={iter_time}"
    if extra:
        opts += "," + extra
    run_qemu_img(["create", "-q", "-f", fmt, "--object", f"secret,id=s0,data={passphrase}",
                  "-o", opts, path, size])


def cryptsetup_unlocks(path: str, passphrase: bytes) -> bool:
    """True if cryptsetup accepts the passphrase (``open --test-passphrase``)."""
    require("cryptsetup")
    args = ["cryptsetup", "open", "--test-passphrase", "--key-file", "-"]
    proc = run(args + [path], input=passphrase, check=False)
    return proc.returncode == 0


def cryptsetup_volume_key(path: str, passphrase: bytes) -> bytes:
    """The volume key as cryptsetup sees it."""
    require("cryptsetup")
    proc = run(["cryptsetup", "luksDump", "--dump-volume-key", "--batch-mode",
                "--key-file", "-", path], input=passphrase)
    out = proc.stdout.decode()
    lines = out.splitlines()
    hexchars = []
    collecting = False
    for line in lines:
        if line.startswith("MK dump:") or line.startswith("Volume key:"):
            collecting = True
            hexchars.append(line.split(":", 1)[1])
            continue
        if collecting:
            if line.startswith("\t") or line.startswith(" "):
                hexchars.append(line)
            else:
                break
    return bytes.fromhex("".join(hexchars).replace(" ", "").replace("\t", ""))
