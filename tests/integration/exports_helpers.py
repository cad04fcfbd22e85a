"""Helpers for the NBD export tests: a QMP client, images, NBD clients, libnbd.

The daemons run as subprocesses (the ``qmpd_daemon`` fixture, or qsd through
tests.tools.qsd_transcript.start_qsd); these helpers talk to them as real
clients would.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

from tests.oracles import IN_CI, qemu_img_create_luks, require, run, run_qemu_img
from tests.qmp_client import QmpClient

LIBNBD_PYTHON = "/usr/bin/python3"


class Qmp(QmpClient):
    """tests/qmp_client.py's client, connected (retrying while the daemon
    starts) and negotiated."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        super().__init__(path, timeout=60.0, connect_timeout=timeout, negotiate=True)


def nbd_uri(sock: str, name: str = "disk") -> str:
    return f"nbd+unix:///{name}?socket={sock}"


_TEMPLATES: dict[tuple, str] = {}
_TEMPLATE_DIR: list[str] = []


def luks_image(path: str, passphrase: str = "pw0", size: str = "16M", fmt: str = "luks",
               extra: str = "") -> str:
    """A LUKS image made by qemu-img, once per distinct kind per run and copied after.

    qemu-img calibrates PBKDF2 for every image it makes (seconds on a busy
    machine); a copy differs only in what no test here looks at.
    """
    key = (passphrase, size, fmt, extra)
    if key not in _TEMPLATES:
        if not _TEMPLATE_DIR:
            import atexit
            import tempfile
            _TEMPLATE_DIR.append(tempfile.mkdtemp(prefix="qxtpl-"))
            atexit.register(shutil.rmtree, _TEMPLATE_DIR[0], True)
        template = os.path.join(_TEMPLATE_DIR[0], f"t{len(_TEMPLATES)}.img")
        qemu_img_create_luks(template, passphrase, size=size, iter_time=10, fmt=fmt,
                             extra=extra)
        _TEMPLATES[key] = template
    shutil.copyfile(_TEMPLATES[key], path)
    return path


def plain_image(path: str, fmt: str = "raw", size: str = "16M") -> str:
    run_qemu_img(["create", "-q", "-f", fmt, path, size])
    return path


def luks_node_args(path: str, passphrase: str = "pw0", node: str = "l0",
                   fmt: str = "luks") -> list[str]:
    """--object/--blockdev arguments for a raw LUKS or qcow2+LUKS node."""
    if fmt == "luks":
        blockdev = (f"driver=luks,node-name={node},key-secret=s0,file.driver=file,"
                    f"file.filename={path}")
    else:
        blockdev = (f"driver=qcow2,node-name={node},encrypt.format=luks,encrypt.key-secret=s0,"
                    f"file.driver=file,file.filename={path}")
    return ["--object", f"secret,id=s0,data={passphrase}", "--blockdev", blockdev]


def export_args(nbd_sock: str, node: str = "l0", name: str = "disk", writable: bool = True,
                extra: str = "") -> list[str]:
    export = f"type=nbd,id=e0,node-name={node},name={name},writable={'on' if writable else 'off'}"
    if extra:
        export += "," + extra
    return ["--nbd-server", f"addr.type=unix,addr.path={nbd_sock}", "--export", export]


def image_opts(path: str, passphrase: str | None, fmt: str) -> list[str]:
    """qemu-io/qemu-img arguments that open the image file itself."""
    if fmt == "raw" or passphrase is None:
        return ["-f", fmt, path]
    if fmt == "luks":
        spec = f"driver=luks,key-secret=k0,file.filename={path}"
    else:
        spec = f"driver=qcow2,encrypt.key-secret=k0,file.filename={path}"
    return ["--object", f"secret,id=k0,data={passphrase}", "--image-opts", spec]


def qemu_io(args: list[str], *commands: str, check: bool = True) -> subprocess.CompletedProcess:
    require("qemu-io")
    argv = ["qemu-io"]
    for c in commands:
        argv += ["-c", c]
    proc = run(argv + args, check=False, timeout=120)
    out = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
    if check:
        assert proc.returncode == 0 and "error" not in out.lower() and \
            "failed" not in out.lower() and "Pattern verification" not in out, out
    return proc


def hold_nbd_client(sock: str, name: str = "disk") -> socket.socket:
    """A client that negotiates ``name`` (fixed newstyle, OPT_GO) and then just stays."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(sock)
    greeting = _recv_exactly(s, 18)
    assert greeting[:16] == b"NBDMAGICIHAVEOPT", greeting
    s.sendall(struct.pack(">I", 3))              # FIXED_NEWSTYLE | NO_ZEROES
    payload = struct.pack(">I", len(name)) + name.encode() + struct.pack(">H", 0)
    s.sendall(b"IHAVEOPT" + struct.pack(">II", 7, len(payload)) + payload)   # NBD_OPT_GO
    while True:
        head = _recv_exactly(s, 20)
        _magic, _opt, rep, length = struct.unpack(">QIII", head)
        _recv_exactly(s, length)
        if rep == 1:        # NBD_REP_ACK
            return s
        if rep & 0x80000000:
            raise AssertionError(f"OPT_GO refused: {rep:#x}")


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise EOFError("NBD server hung up")
        data += chunk
    return data


def require_libnbd() -> None:
    """/usr/bin/python3 with the nbd module (python3-libnbd)."""
    ok = os.path.exists(LIBNBD_PYTHON) and subprocess.run(
        [LIBNBD_PYTHON, "-c", "import nbd"], capture_output=True).returncode == 0
    if not ok:
        message = "python3-libnbd is not installed for /usr/bin/python3"
        if IN_CI:
            pytest.fail(message + " (CI=true: a missing oracle is a failure)")
        pytest.skip(message)


def libnbd(script: str, *args: str, timeout: float = 120) -> str:
    """Run ``script`` under /usr/bin/python3 (which has ``import nbd``); its stdout."""
    require_libnbd()
    proc = subprocess.run([LIBNBD_PYTHON, "-c", script, *args], capture_output=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout.decode()


def wait_for_socket(path: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.02)


def random_file(path: Path | str, size: int, seed: int = 1) -> bytes:
    import random
    data = random.Random(seed).randbytes(size)
    Path(path).write_bytes(data)
    return data


def short_tmp(prefix: str = "qx-") -> str:
    import tempfile
    return tempfile.mkdtemp(prefix=prefix)


def rmtree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
