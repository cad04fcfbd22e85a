"""SIGKILL at random moments during key add, erase, forced overwrite and creation.

Each round copies a template image (raw LUKS or qcow2 with LUKS inside,
passphrase P0 in slot 0, P1 in slot 1, 1 MiB of 0x5a written through the
encryption), starts qmpd on it, starts the amend (or a blockdev-create of
a new image) with an iter-time of 100-300 ms so that the work takes a
while, and kills the daemon with SIGKILL after a random delay spread over
the job's duration. Then, with the reference tools:

- every passphrase the operation does not remove still unlocks
  (cryptsetup for raw LUKS, qemu-io for qcow2);
- the volume key is unchanged (cryptsetup luksDump) and the data written
  before reads back (qemu-io ``read -P 0x5a``, which only matches if the
  volume key is the same);
- a new daemon starts on the same socket path (the dead one left a stale
  socket file) and reopens the image read-write (the dead process's OFD
  locks went with it).
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

from tests.oracles import cryptsetup_unlocks, cryptsetup_volume_key, require, run
from tests.oracles import qemu_img_create_luks as qemu_img_luks
from tests.reliability.launch import start_qmpd, stop
from tests.qmp_client import QmpClient

pytestmark = pytest.mark.interop

P0, P1, P2 = "kill-test-zero", "kill-test-one", "kill-test-two"
SECRETS = [f"secret,id=s0,data={P0}", f"secret,id=s1,data={P1}", f"secret,id=s2,data={P2}"]
OBJECTS = [arg for text in SECRETS for arg in ("--object", text)]


def _blockdev(fmt: str, image: str, node: str = "d0") -> dict:
    if fmt == "luks":
        return {"driver": "luks", "node-name": node, "key-secret": "s0",
                "file": {"driver": "file", "filename": image}}
    return {"driver": "qcow2", "node-name": node,
            "encrypt": {"format": "luks", "key-secret": "s0"},
            "file": {"driver": "file", "filename": image}}


def _image_opts(fmt: str, image: str, secret: str) -> str:
    if fmt == "luks":
        return f"driver=luks,key-secret={secret},file.filename={image}"
    return f"driver=qcow2,encrypt.key-secret={secret},file.filename={image}"


def qemu_io(fmt: str, image: str, passphrase: str, command: str) -> subprocess.CompletedProcess:
    require("qemu-io")
    return run(["qemu-io", "--object", f"secret,id=k,data={passphrase}", "--image-opts",
                _image_opts(fmt, image, "k"), "-c", command], check=False)


def unlocks(fmt: str, image: str, passphrase: str) -> bool:
    if fmt == "luks":
        return cryptsetup_unlocks(image, passphrase.encode())
    proc = qemu_io(fmt, image, passphrase, "read -P 0x5a 0 1M")
    return proc.returncode == 0 and b"Pattern verification failed" not in proc.stdout


def opens_new(fmt: str, image: str, passphrase: str) -> bool:
    """A freshly created image unlocks with ``passphrase`` and reads as zeros."""
    if fmt == "luks" and not cryptsetup_unlocks(image, passphrase.encode()):
        return False
    proc = qemu_io(fmt, image, passphrase, "read -P 0 0 64k")
    return proc.returncode == 0 and b"Pattern verification failed" not in proc.stdout


def data_reads_back(fmt: str, image: str, passphrase: str) -> bool:
    proc = qemu_io(fmt, image, passphrase, "read -P 0x5a 0 1M")
    return (proc.returncode == 0 and b"Pattern verification failed" not in proc.stdout
            and b"read 1048576/1048576" in proc.stdout)


class Workdir:
    def __init__(self) -> None:
        self.path = tempfile.mkdtemp(prefix="qmpd-k-")
        self.sock = os.path.join(self.path, "q.sock")
        self.n = 0

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def daemon(self, *args: str) -> subprocess.Popen:
        self.n += 1
        return start_qmpd(self.sock, self.file(f"qmpd-{self.n}.log"), *OBJECTS, *args,
                          cwd=self.path)


@pytest.fixture(scope="module")
def workdir():
    w = Workdir()
    yield w
    shutil.rmtree(w.path, ignore_errors=True)


@pytest.fixture(scope="module")
def templates(workdir):
    """Per format: an image with P0 in slot 0, P1 in slot 1 and data, and its volume key."""
    require("cryptsetup")
    out = {}
    for fmt in ("luks", "qcow2"):
        image = workdir.file(f"template.{fmt}")
        qemu_img_luks(image, P0, fmt=fmt)
        proc = qemu_io(fmt, image, P0, "write -P 0x5a 0 1M")
        assert proc.returncode == 0, proc.stderr
        daemon = workdir.daemon()
        try:
            with QmpClient(workdir.sock) as q:
                q.negotiate()
                q.ok("blockdev-add", _blockdev(fmt, image))
                q.ok("x-blockdev-amend", {"job-id": "add1", "node-name": "d0", "options": _amend(
                    fmt, {"state": "active", "new-secret": "s1", "keyslot": 1, "iter-time": 10})})
                assert "error" not in q.wait_job("add1")
                q.ok("blockdev-del", {"node-name": "d0"})
        finally:
            stop(daemon)
        key = cryptsetup_volume_key(image, P0.encode()) if fmt == "luks" else None
        assert unlocks(fmt, image, P1)
        out[fmt] = (image, key)
    return out


def _amend(fmt: str, luks: dict) -> dict:
    if fmt == "luks":
        return {"driver": "luks", **luks}
    return {"driver": "qcow2", "encrypt": {"format": "luks", **luks}}


#: operation -> (amend options, passphrases that must survive)
OPERATIONS = {
    "add": (lambda t: {"state": "active", "new-secret": "s2", "iter-time": t}, [P0, P1]),
    "erase": (lambda t: {"state": "inactive", "old-secret": "s1"}, [P0]),
    "force-overwrite": (lambda t: {"state": "active", "new-secret": "s2", "keyslot": 1,
                                   "iter-time": t}, [P0]),
}


def _messages_received(q: QmpClient) -> bytes:
    """What the dead daemon had sent (still in our receive buffer)."""
    q.sock.setblocking(False)
    data = q._buf
    try:
        while chunk := q.sock.recv(65536):
            data += chunk
    except (BlockingIOError, ConnectionResetError):
        pass
    return data


def _kill_round(workdir, templates, fmt: str, op: str, rng: random.Random) -> bool:
    """One amend killed at a random moment; True if the kill landed inside the job."""
    template, volume_key = templates[fmt]
    image = workdir.file(f"victim.{fmt}")
    shutil.copyfile(template, image)
    make_options, must_survive = OPERATIONS[op]
    iter_time = rng.randint(100, 300)
    daemon = workdir.daemon()
    q = QmpClient(workdir.sock)
    q.negotiate()
    q.ok("blockdev-add", _blockdev(fmt, image))
    args = {"job-id": "victim", "node-name": "d0", "options": _amend(fmt, make_options(iter_time))}
    if op == "force-overwrite":
        args["force"] = True
    q.ok("x-blockdev-amend", args)
    # PBKDF2 calibration and the slot's own iterations take about iter-time
    # (plus re-unlock checks); aim across all of it and a little past.
    time.sleep(rng.uniform(0, 1.3 * iter_time / 1000))
    os.kill(daemon.pid, signal.SIGKILL)
    daemon.wait()
    inside = b'"concluded"' not in _messages_received(q)
    q.close()
    for passphrase in must_survive:
        assert unlocks(fmt, image, passphrase), (fmt, op, passphrase, "lost")
    if fmt == "luks":
        assert cryptsetup_volume_key(image, P0.encode()) == volume_key
    assert data_reads_back(fmt, image, P0), (fmt, op)
    _restart_reopens(workdir, fmt, image)
    return inside


def _restart_reopens(workdir, fmt: str, image: str) -> None:
    assert os.path.exists(workdir.sock)  # SIGKILL left the socket file behind
    daemon = workdir.daemon()
    try:
        with QmpClient(workdir.sock) as q:
            q.negotiate()
            q.ok("blockdev-add", _blockdev(fmt, image))  # read-write: no stale lock
            q.ok("blockdev-del", {"node-name": "d0"})
    finally:
        stop(daemon)


@pytest.mark.parametrize("fmt", ["luks", "qcow2"])
def test_sigkill_during_amend(workdir, templates, fmt, scale, figures):
    rng = random.Random(f"kill-{fmt}")
    rounds = scale(1, 40)
    kills = inside = 0
    for _ in range(rounds):
        for op in OPERATIONS:
            inside += _kill_round(workdir, templates, fmt, op, rng)
            kills += 1
    figures(f"SIGKILL during {fmt} amend: kills survived (inside the job)", f"{kills} ({inside})")
    assert inside > 0


@pytest.mark.parametrize("fmt", ["luks", "qcow2"])
def test_sigkill_during_create(workdir, templates, fmt, scale, figures):
    """Killed while creating: a bystander image is untouched; the new one opens or
    is refused with a clear error; the daemon restarts on the stale socket."""
    rng = random.Random(7 + len(fmt))
    bystander, _ = templates[fmt]
    digest = hashlib.sha256(open(bystander, "rb").read()).hexdigest()
    kills = opened = 0
    for i in range(scale(1, 30)):
        target = workdir.file(f"new-{i}.{fmt}")
        open(target, "wb").close()
        iter_time = rng.randint(100, 300)
        daemon = workdir.daemon()
        q = QmpClient(workdir.sock)
        q.negotiate()
        q.ok("blockdev-add", _blockdev(fmt, bystander, "b0"))
        q.ok("blockdev-add", {"driver": "file", "node-name": "f0", "filename": target})
        if fmt == "luks":
            options = {"driver": "luks", "file": "f0", "key-secret": "s0", "size": 16 << 20,
                       "iter-time": iter_time}
        else:
            options = {"driver": "qcow2", "file": "f0", "size": 16 << 20, "encrypt": {
                "format": "luks", "key-secret": "s0", "iter-time": iter_time}}
        q.ok("blockdev-create", {"job-id": "mk", "options": options})
        time.sleep(rng.uniform(0, 1.3 * iter_time / 1000))
        os.kill(daemon.pid, signal.SIGKILL)
        daemon.wait()
        q.close()
        kills += 1
        assert hashlib.sha256(open(bystander, "rb").read()).hexdigest() == digest
        daemon = workdir.daemon()
        try:
            with QmpClient(workdir.sock) as q:
                q.negotiate()
                reply = q.cmd("blockdev-add", _blockdev(fmt, target, "n0"))
                assert ("return" in reply) != ("error" in reply), reply
                if "error" in reply:
                    assert reply["error"]["desc"], reply
                else:
                    opened += 1
                    assert opens_new(fmt, target, P0)
                assert q.ok("query-version")
        finally:
            stop(daemon)
    figures(f"SIGKILL during {fmt} create: kills survived (new image opened after)",
            f"{kills} ({opened})")
