"""Secret hygiene: nothing the daemon says, logs or raises carries a secret.

What Python cannot guarantee (and these tests therefore do not claim): a
passphrase arrives inside the client's JSON as an immutable ``str`` (the
parsed message, the schema validator's view of it) and those copies live
until the garbage collector reuses their memory; ``cryptography`` and
OpenSSL make their own copies of keys while deriving and en/decrypting;
``bytes`` intermediates of PBKDF2 and the AF splitter cannot be wiped.
What the daemon *owns* — secret objects' values, the copies handed to the
block layer, volume keys and the sector ciphers' keys — are bytearrays that
are zeroed once no longer needed; the in-process tests below check that.
"""

from __future__ import annotations

import base64
import os
import stat
import subprocess
import sys
import tempfile
import threading

import pytest

from tests.oracles import cryptsetup_volume_key
from tests.oracles import qemu_img_create_luks as qemu_img_luks
from tests.reliability.launch import start_qmpd, stop
from tests.qmp_client import QmpClient

PLANTED = ["Xylophone-Secret-4711", "Qwerty-Hidden-0815", "Zebra-Passphrase-1234"]


def _forms(secret: bytes) -> list[bytes]:
    """The ways a leaked secret could be spelt."""
    return [secret, secret.hex().encode(), secret.hex().upper().encode(),
            base64.b64encode(secret).rstrip(b"=")]


@pytest.mark.interop
@pytest.mark.parametrize("fmt", ["luks", "qcow2"])
def test_no_secret_in_replies_events_errors_or_logs(fmt, figures):
    work = tempfile.mkdtemp(prefix="qmpd-s-")
    image = os.path.join(work, f"img.{fmt}")
    p0, p1, p2 = PLANTED
    qemu_img_luks(image, p0, fmt=fmt)
    volume_key = cryptsetup_volume_key(image, p0.encode()) if fmt == "luks" else None
    sock, log_path = os.path.join(work, "q.sock"), os.path.join(work, "qmpd.log")
    proc = start_qmpd(sock, log_path, "--log-level", "debug", "--object",
                      f"secret,id=s0,data={p0}")
    wire = bytearray()
    try:
        q = QmpClient(sock)
        q.negotiate()

        def call(command, arguments=None):
            reply = q.cmd(command, arguments)
            wire.extend(repr(reply).encode())
            return reply

        file_opts = {"driver": "file", "filename": image}
        node = ({"driver": "luks", "key-secret": "s0"} if fmt == "luks"
                else {"driver": "qcow2", "encrypt": {"format": "luks", "key-secret": "s0"}})

        def amend(luks):
            return ({"driver": "luks", **luks} if fmt == "luks"
                    else {"driver": "qcow2", "encrypt": {"format": "luks", **luks}})

        call("object-add", {"qom-type": "secret", "id": "s1", "data": p1})
        call("object-add", {"qom-type": "secret", "id": "s2",
                            "data": base64.b64encode(p2.encode()).decode(), "format": "base64"})
        # Errors around secrets: duplicate id, bad base64, wrong passphrase.
        call("object-add", {"qom-type": "secret", "id": "s1", "data": p1})
        call("object-add", {"qom-type": "secret", "id": "s3", "data": p1 + "!", "format": "base64"})
        call("object-add", {"qom-type": "secret", "id": "s4", "data": p1, "keyid": "s0"})
        call("blockdev-add", {**node, "node-name": "bad",
                              **({"key-secret": "s1"} if fmt == "luks" else
                                 {"encrypt": {"format": "luks", "key-secret": "s1"}}),
                              "file": file_opts})
        assert "return" in call("blockdev-add", {**node, "node-name": "d0", "file": file_opts})
        for job, luks in [("a1", {"state": "active", "new-secret": "s1", "iter-time": 10}),
                          ("a2", {"state": "active", "new-secret": "s2", "old-secret": "s1",
                                  "iter-time": 10}),
                          ("bad", {"state": "active", "new-secret": "s2", "old-secret": "s2",
                                   "keyslot": 1, "iter-time": 10}),
                          ("e1", {"state": "inactive", "old-secret": "s1"}),
                          ("e2", {"state": "inactive", "old-secret": "s1"})]:
            reply = call("x-blockdev-amend", {"job-id": job, "node-name": "d0",
                                              "options": amend(luks)})
            if "return" in reply:
                wire.extend(repr(q.wait_job(job)).encode())
        for command in ("query-named-block-nodes", "query-jobs", "query-commands"):
            call(command)
        call("query-named-block-nodes", {"flat": True})
        call("object-del", {"id": "s1"})
        call("blockdev-del", {"node-name": "d0"})
        wire.extend(repr(q.events).encode())
        q.close()
    finally:
        stop(proc)
    logs = open(log_path, "rb").read()
    assert b"DEBUG" in logs  # the most talkative level was on
    haystacks = {"replies and events": bytes(wire), "log (debug level)": logs}
    for secret in [s.encode() for s in PLANTED] + ([volume_key] if volume_key else []):
        for name, haystack in haystacks.items():
            for form in _forms(secret):
                assert form not in haystack, f"a secret leaked into the {name}"
    figures(f"secrets ({fmt}): bytes of replies/events and debug log searched",
            f"{len(wire)} / {len(logs)}")


def test_no_secret_in_exception_messages():
    """Engine and store errors never carry the passphrase that caused them."""
    from qmpd.crypto.errors import CryptoError
    from qmpd.crypto.luks import LuksCreateOptions, MemoryImageIO, create_volume, open_volume
    from qmpd.crypto.secrets import SecretStore

    io = MemoryImageIO()
    secret = PLANTED[0].encode()
    volume = create_volume(io, bytearray(secret), LuksCreateOptions(iter_time=1))
    key = bytes(volume.volume_key)
    texts = [repr(volume), repr(volume.header), str(volume.info())]
    volume.close()
    for wrong in (PLANTED[1].encode(), b""):
        with pytest.raises(CryptoError) as err:
            open_volume(io, bytearray(wrong))
        texts += [str(err.value), repr(err.value)]
    store = SecretStore()
    for kwargs in ({"data": PLANTED[2] + "%", "format": "base64"},
                   {"data": PLANTED[2], "keyid": "nope", "iv": "AAAA"},
                   {"data": PLANTED[2], "file": "/x"}):
        with pytest.raises(CryptoError) as err:
            store.add("s", **kwargs)
        texts += [str(err.value), repr(err.value)]
    store.add("ok", data=PLANTED[2])
    texts.append(repr(store._secrets["ok"]))
    joined = "\n".join(texts).encode()
    for needle in [s.encode() for s in PLANTED] + [key, key.hex().encode()]:
        assert needle not in joined


async def test_owned_buffers_are_wiped():
    """Secret values, lookup copies, volume keys and cipher keys are zeroed after use."""
    from qmpd.daemon import Daemon

    work = tempfile.mkdtemp(prefix="qmpd-w-")
    image = os.path.join(work, "img.luks")
    from qmpd.block import blockdev
    from qmpd.crypto.luks import LuksCreateOptions, create_volume
    from qmpd.posixio import FileImageIO
    with open(image, "wb") as f:
        f.truncate(4 << 20)
    with FileImageIO(image) as io:
        create_volume(io, bytearray(PLANTED[0].encode()), LuksCreateOptions(iter_time=1)).close()
    daemon = Daemon()
    daemon.secrets.add("s0", data=PLANTED[0])
    daemon.objects["s0"] = "secret"
    value = daemon.secrets._secrets["s0"]._value
    copies = []
    original_lookup = daemon.secrets.lookup

    def spying_lookup(secret_id):
        copy = original_lookup(secret_id)
        copies.append(copy)
        return copy

    daemon.secrets.lookup = spying_lookup
    await blockdev.add(daemon.nodes, {"driver": "luks", "node-name": "d0", "key-secret": "s0",
                            "file": {"driver": "file", "filename": image}})
    node = daemon.nodes.find("d0")
    volume = node.volume
    volume_key = volume.volume_key
    cipher_key = volume.cipher._key
    assert any(volume_key) and any(cipher_key)
    assert copies and all(not any(c) for c in copies), "a lookup copy was not wiped"
    await blockdev.delete(daemon.nodes, "d0")
    assert not any(volume_key) and not any(cipher_key), "volume key survives blockdev-del"
    daemon.secrets.delete("s0")
    assert not any(value), "secret value survives object-del"
    await daemon.close()


async def test_socket_is_0600_from_its_first_instant():
    from qmpd.qmp.server import open_unix_listener

    work = tempfile.mkdtemp(prefix="qmpd-p-")
    for i in range(30):
        path = os.path.join(work, f"s{i}.sock")
        seen = []

        def watch():
            while not seen:
                try:
                    seen.append(os.lstat(path).st_mode)
                except FileNotFoundError:
                    pass

        watcher = threading.Thread(target=watch)
        watcher.start()
        listener = open_unix_listener(path)
        watcher.join(5)
        listener.socket.close()
        assert seen and stat.S_ISSOCK(seen[0]) and stat.S_IMODE(seen[0]) & 0o077 == 0, seen
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600


def test_daemon_socket_mode_and_refusals(tmp_path):
    work = tempfile.mkdtemp(prefix="qmpd-r-")
    sock = os.path.join(work, "q.sock")
    proc = start_qmpd(sock, os.path.join(work, "a.log"))
    try:
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        # A second daemon on a live socket refuses (and leaves it alone).
        second = subprocess.run([sys.executable, "-m", "qmpd", "--socket", sock],
                                capture_output=True, timeout=30)
        assert second.returncode != 0 and b"another process is listening" in second.stderr
        with QmpClient(sock) as q:
            q.negotiate()
    finally:
        stop(proc)
    for kind in ("file", "dir", "symlink"):
        path = os.path.join(work, kind)
        if kind == "file":
            open(path, "w").write("precious")
        elif kind == "dir":
            os.mkdir(path)
        else:
            os.symlink("/etc/hostname", path)
        proc = subprocess.run([sys.executable, "-m", "qmpd", "--socket", path],
                              capture_output=True, timeout=30)
        assert proc.returncode == 1, (kind, proc.stderr)
        assert b"not a socket" in proc.stderr, (kind, proc.stderr)
        assert os.path.lexists(path)
    assert open(os.path.join(work, "file")).read() == "precious"
