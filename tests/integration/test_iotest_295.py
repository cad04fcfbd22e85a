"""QEMU iotest 295 (LUKS key management through x-blockdev-amend) against qmpd.

The scenarios of QEMU's test, for raw LUKS and for LUKS inside qcow2, run on a
qmpd subprocess over QMP. After each step the reference tools say which
passphrases open the image: qemu-io must read back the pattern written when
the image was made (so the volume key is unchanged), and for raw LUKS
cryptsetup must agree and dump the same volume key. Every refused amend must
leave the image byte for byte as it was, and fail the job with QEMU's text.

The helpers here (Monitor, Image) are shared by the iotest 296 and
cross-implementation tests of this directory.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from tests.oracles import (cryptsetup_unlocks, cryptsetup_volume_key, qemu_img_create_luks,
                           require, run, run_qemu_img)

pytestmark = pytest.mark.interop

#: The data every image carries from birth: read back through the volume key.
PATTERN = "0x5a"
PATTERN_LEN = "64k"
PASSPHRASES = [f"hunter{i}" for i in range(6)]
SECRET_IDS = [f"keysec{i}" for i in range(6)]
JOB_TIMEOUT = 30.0


# -- a QMP monitor, driven synchronously ------------------------------------------------

class Monitor:
    """One QMP connection (to qmpd or qemu-storage-daemon) with iotests' verbs."""

    def __init__(self, sock: str) -> None:
        self.qmp = QEMUMonitorProtocol(sock)
        self.greeting = self.qmp.connect(negotiate=True)

    def close(self) -> None:
        self.qmp.close()

    def reply(self, command: str, args: dict | None = None) -> dict:
        return self.qmp.cmd_raw(command, args)

    def ok(self, command: str, args: dict | None = None):
        reply = self.reply(command, args)
        assert "return" in reply, f"{command} failed: {reply}"
        return reply["return"]

    def error(self, command: str, args: dict | None = None) -> str:
        """The desc of the GenericError ``command`` must fail with."""
        reply = self.reply(command, args)
        assert "error" in reply, f"{command} unexpectedly succeeded: {reply}"
        assert reply["error"]["class"] == "GenericError", reply
        return reply["error"]["desc"]

    def add_secrets(self, count: int = len(PASSPHRASES)) -> None:
        for sid, data in list(zip(SECRET_IDS, PASSPHRASES))[:count]:
            self.ok("object-add", {"qom-type": "secret", "id": sid, "data": data})

    def job_statuses(self, job_id: str, until: str = "concluded") -> list[str]:
        """JOB_STATUS_CHANGE statuses of ``job_id`` up to ``until`` (or 'null')."""
        statuses: list[str] = []
        deadline = time.monotonic() + JOB_TIMEOUT
        while not statuses or statuses[-1] not in (until, "null"):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"job {job_id} stuck after {statuses}"
            event = self.qmp.pull_event(wait=remaining)
            if event and event["event"] == "JOB_STATUS_CHANGE" \
                    and event["data"]["id"] == job_id:
                statuses.append(event["data"]["status"])
        return statuses

    def run_job(self, job_id: str) -> str | None:
        """Wait for the job to conclude, dismiss it; its error text or None."""
        statuses = self.job_statuses(job_id)
        assert statuses[-1] == "concluded", statuses
        [job] = [j for j in self.ok("query-jobs") if j["id"] == job_id]
        assert job["status"] == "concluded" and job["type"] == "amend"
        self.ok("job-dismiss", {"id": job_id})
        assert self.job_statuses(job_id, "null")[-1] == "null"
        assert statuses[-2] == ("aborting" if "error" in job else "pending"), statuses
        return job.get("error")

    def amend(self, node: str, image: "Image", luks_options: dict, *, force: bool = False,
              job_id: str = "job0", command: str = "x-blockdev-amend") -> str | None:
        """Start an amend job and run it; the job's error text or None."""
        args = {"node-name": node, "job-id": job_id, "options": image.amend_options(luks_options)}
        if force:
            args["force"] = True
        assert self.ok(command, args) == {}
        return self.run_job(job_id)

    def slots(self, node: str) -> list[int]:
        """The active key slots as the daemon itself reports them."""
        for info in self.ok("query-named-block-nodes"):
            if info["node-name"] == node:
                data = info["image"]["format-specific"]["data"]
                data = data.get("encrypt", data)
                return [i for i, slot in enumerate(data["slots"]) if slot["active"]]
        raise AssertionError(f"no node {node}")


# -- an image and what the reference tools say about it ---------------------------------

class Image:
    """A LUKS image (raw or in qcow2) and how each tool names it."""

    def __init__(self, path: str, fmt: str) -> None:
        self.path, self.fmt = path, fmt

    def blockdev(self, node: str, secret_id: str = SECRET_IDS[0], *,
                 read_only: bool = False) -> dict:
        options = {"driver": self.fmt, "node-name": node, "read-only": read_only,
                   "file": {"driver": "file", "filename": self.path}}
        if self.fmt == "qcow2":
            options["encrypt"] = {"format": "luks", "key-secret": secret_id}
        else:
            options["key-secret"] = secret_id
        return options

    def amend_options(self, luks_options: dict) -> dict:
        if self.fmt == "qcow2":
            return {"driver": "qcow2", "encrypt": {"format": "luks", **luks_options}}
        return {"driver": "luks", **luks_options}

    def image_opts(self, secret_id: str = "s0") -> str:
        key = "encrypt.key-secret" if self.fmt == "qcow2" else "key-secret"
        return f"driver={self.fmt},{key}={secret_id},file.filename={self.path}"

    def keyval_blockdev(self, node: str, secret_id: str = SECRET_IDS[0]) -> str:
        """The same node as qemu-storage-daemon's --blockdev dotted keys."""
        key = "encrypt.format=luks,encrypt.key-secret" if self.fmt == "qcow2" else "key-secret"
        return (f"driver={self.fmt},node-name={node},{key}={secret_id},"
                f"file.driver=file,file.filename={self.path}")

    def digest(self) -> str:
        return hashlib.sha256(Path(self.path).read_bytes()).hexdigest()

    def qemu_reads_pattern(self, passphrase: str) -> bool:
        """Does QEMU open the image with this passphrase and read the birth pattern?

        -U (force share): qemu-io takes no lock, so it can look while a
        daemon holds the image. A wrong pattern (a changed volume key) fails.
        """
        proc = run(["qemu-io", "-r", "-U", "--object", f"secret,id=s0,data={passphrase}",
                    "--image-opts", self.image_opts(), "-c",
                    f"read -P {PATTERN} 0 {PATTERN_LEN}"], check=False)
        if b"Invalid password, cannot unlock any keyslot" in proc.stderr:
            return False
        out = proc.stdout.decode()
        assert proc.returncode == 0 and "Pattern verification failed" not in out \
            and f"read {64 << 10}/{64 << 10} bytes" in out, \
            f"qemu-io: {proc.stderr.decode(errors='replace')}{out}"
        return True

    def qemu_slots(self, passphrase: str) -> list[int]:
        """The active key slots as qemu-img sees them (opened with ``passphrase``)."""
        proc = run_qemu_img(["info", "-U", "--output=json", "--object",
                             f"secret,id=s0,data={passphrase}", "--image-opts",
                             self.image_opts()])
        data = json.loads(proc.stdout)["format-specific"]["data"]
        data = data.get("encrypt", data)
        return [i for i, slot in enumerate(data["slots"]) if slot["active"]]

    def unlockers(self, volume_key: bytes | None = None) -> set[int]:
        """Indexes of the PASSPHRASES that open the image, per the reference tools.

        Raw LUKS: cryptsetup decides, must dump ``volume_key``, and qemu-io
        must read the pattern with one of the passphrases; qcow2: qemu-io.
        """
        if self.fmt == "qcow2":
            return {i for i, pw in enumerate(PASSPHRASES) if self.qemu_reads_pattern(pw)}
        found = {i for i, pw in enumerate(PASSPHRASES)
                 if cryptsetup_unlocks(self.path, pw.encode())}
        if found:
            first = PASSPHRASES[min(found)]
            assert self.qemu_reads_pattern(first)
            if volume_key is not None:
                assert cryptsetup_volume_key(self.path, first.encode()) == volume_key
        else:
            assert not self.qemu_reads_pattern(PASSPHRASES[0])
        return found


def make_template(directory: Path, fmt: str) -> Image:
    """A 1 MiB image keyed with hunter0 (slot 0) whose first 64 KiB hold PATTERN."""
    require("qemu-io")
    name = "tpl.qcow2" if fmt == "qcow2" else "tpl.luks"
    image = Image(str(directory / name), fmt)
    # QEMU's PBKDF2 calibration flakes most at small iter-times on a busy
    # machine; run_qemu_img retries, and a longer iter-time is the last resort.
    for iter_time in (10, 10, 50):
        try:
            qemu_img_create_luks(image.path, PASSPHRASES[0], size="1M", fmt=fmt,
                                 iter_time=iter_time)
            break
        except AssertionError as err:
            if "Unable to get accurate CPU usage" not in str(err) or iter_time == 50:
                raise
    run(["qemu-io", "--object", f"secret,id=s0,data={PASSPHRASES[0]}", "--image-opts",
         image.image_opts(), "-c", f"write -P {PATTERN} 0 {PATTERN_LEN}"])
    return image


_TEMPLATES: dict[str, tuple[Image, bytes | None]] = {}


@pytest.fixture
def templates(tmp_path_factory) -> dict[str, tuple[Image, bytes | None]]:
    """Per format: the template image and (raw LUKS) its volume key.

    qemu-img takes seconds to make a LUKS image whatever the iter-time, so
    the templates are made once per test session (in tmp_path_factory's
    session directory) and shared by every module that imports this fixture.
    """
    for fmt in ("luks", "qcow2"):
        if fmt not in _TEMPLATES or not Path(_TEMPLATES[fmt][0].path).exists():
            image = make_template(tmp_path_factory.mktemp("iotest-tpl"), fmt)
            key = cryptsetup_volume_key(image.path, PASSPHRASES[0].encode()) \
                if fmt == "luks" else None
            _TEMPLATES[fmt] = (image, key)
    return _TEMPLATES


def copy_image(templates, fmt: str, tmp_path: Path) -> tuple[Image, bytes | None]:
    template, key = templates[fmt]
    path = tmp_path / Path(template.path).name.replace("tpl", "test")
    shutil.copy(template.path, path)
    return Image(str(path), fmt), key


# -- iotest 295 ------------------------------------------------------------------------

FORMATS = pytest.mark.parametrize("fmt", ["luks", "qcow2"])


@pytest.fixture
def setup(qmpd_daemon, templates, tmp_path, fmt):
    """(monitor, image, volume key) with the image open as node 'testdev'."""
    image, key = copy_image(templates, fmt, tmp_path)
    sock, _ = qmpd_daemon()
    mon = Monitor(sock)
    mon.add_secrets()
    mon.ok("blockdev-add", image.blockdev("testdev"))
    yield mon, image, key
    mon.close()


def add_key(index: int, **extra) -> dict:
    return {"state": "active", "new-secret": SECRET_IDS[index], "iter-time": 10, **extra}


@FORMATS
def test_change_key(setup, fmt):
    mon, image, key = setup
    assert mon.amend("testdev", image, add_key(1)) is None           # first free slot: 1
    assert mon.amend("testdev", image, add_key(2, keyslot=5)) is None
    assert image.qemu_slots(PASSPHRASES[1]) == [0, 1, 5] == mon.slots("testdev")
    assert image.unlockers(key) == {0, 1, 2}
    assert mon.amend("testdev", image, {"state": "inactive",
                                        "old-secret": SECRET_IDS[0]}) is None
    assert image.unlockers(key) == {1, 2}
    assert image.qemu_slots(PASSPHRASES[2]) == [1, 5] == mon.slots("testdev")
    # reopen with the new key; the erased one no longer opens it
    mon.ok("blockdev-del", {"node-name": "testdev"})
    assert mon.error("blockdev-add", image.blockdev("testdev", SECRET_IDS[0])) == \
        "Invalid password, cannot unlock any keyslot"
    mon.ok("blockdev-add", image.blockdev("testdev", SECRET_IDS[1]))
    mon.ok("blockdev-del", {"node-name": "testdev"})


@FORMATS
def test_old_password(setup, fmt):
    mon, image, key = setup
    assert mon.amend("testdev", image, add_key(1)) is None
    assert mon.amend("testdev", image, {"state": "inactive",
                                        "old-secret": SECRET_IDS[0]}) is None
    before = image.digest()
    # the node was opened with keysec0, which no longer unlocks anything
    assert mon.amend("testdev", image, add_key(2)) == \
        "Invalid password, cannot unlock any keyslot"
    assert image.digest() == before
    # 'secret' names a passphrase that still works
    assert mon.amend("testdev", image, add_key(2, secret=SECRET_IDS[1])) is None
    assert image.unlockers(key) == {1, 2}
    assert mon.slots("testdev") == [0, 1]


@FORMATS
def test_use_force_luke(setup, fmt):
    mon, image, key = setup
    assert mon.amend("testdev", image, add_key(1, keyslot=4)) is None
    assert mon.amend("testdev", image, add_key(4, keyslot=2)) is None
    before = image.digest()
    assert mon.amend("testdev", image, add_key(5, keyslot=2)) == \
        "Refusing to overwrite active keyslot 2 - please erase it first"
    assert image.digest() == before
    assert mon.amend("testdev", image, add_key(5, keyslot=2), force=True) is None
    assert image.unlockers(key) == {0, 1, 5}                          # hunter4 overwritten
    assert mon.amend("testdev", image, add_key(0)) is None            # slot 1
    assert mon.slots("testdev") == [0, 1, 2, 4]
    # erase everything
    assert mon.amend("testdev", image, {"state": "inactive",
                                        "old-secret": SECRET_IDS[5]}) is None
    assert mon.amend("testdev", image, {"state": "inactive", "keyslot": 4}) is None
    assert image.unlockers(key) == {0}
    assert image.qemu_slots(PASSPHRASES[0]) == [0, 1]
    before = image.digest()
    assert mon.amend("testdev", image, {"state": "inactive",
                                        "old-secret": SECRET_IDS[0]}) == (
        "All the active keyslots match the (old) password that was given and erasing "
        "them will erase all the data in the image irreversibly - refusing operation")
    assert image.digest() == before
    assert mon.amend("testdev", image, {"state": "inactive", "old-secret": SECRET_IDS[0]},
                     force=True) is None
    assert mon.slots("testdev") == []
    assert image.unlockers() == set()
    mon.ok("blockdev-del", {"node-name": "testdev"})


#: (amend options, job error) pairs that leave an image with slot 0 (hunter0)
#: and slot 3 (hunter3) untouched; QEMU 7.2's texts, checked against
#: qemu-storage-daemon (trailing space of "already erased" included).
REFUSALS = [
    (add_key(1, keyslot=8), "Invalid keyslot 8 specified, must be between 0 and 7"),
    (add_key(1, keyslot=-1), "Invalid keyslot 4294967295 specified, must be between 0 and 7"),
    ({"state": "active", "iter-time": 10}, "'new-secret' is required to activate a keyslot"),
    (add_key(1, **{"old-secret": SECRET_IDS[0]}),
     "'old-secret' must not be given when activating keyslots"),
    (add_key(1, keyslot=0), "Refusing to overwrite active keyslot 0 - please erase it first"),
    (add_key(1, secret=SECRET_IDS[5]), "Invalid password, cannot unlock any keyslot"),
    ({"state": "inactive", "keyslot": 9}, "Invalid keyslot 9 specified, must be between 0 and 7"),
    ({"state": "inactive", "keyslot": -1},
     "Invalid keyslot -1 specified, must be between 0 and 7"),
    ({"state": "inactive", "keyslot": 5}, "Given keyslot 5 is already erased (inactive) "),
    ({"state": "inactive", "keyslot": 0, "old-secret": SECRET_IDS[3]},
     "Given keyslot 0 doesn't contain the given old password for erase operation"),
    ({"state": "inactive", "old-secret": SECRET_IDS[4]},
     "No keyslots match given (old) password for erase operation"),
    ({"state": "inactive"}, "To erase keyslot(s), either explicit keyslot index or the "
                            "password currently contained in them must be given"),
    ({"state": "inactive", "keyslot": 3, "new-secret": SECRET_IDS[1]},
     "'new-secret' must not be given when erasing keyslots"),
    ({"state": "inactive", "keyslot": 3, "iter-time": 10},
     "'iter-time' must not be given when erasing keyslots"),
]


@FORMATS
def test_refusals_have_qemu_texts_and_write_nothing(setup, fmt):
    mon, image, key = setup
    assert mon.amend("testdev", image, add_key(3, keyslot=3)) is None
    before = image.digest()
    for options, expected in REFUSALS:
        assert mon.amend("testdev", image, options) == expected, options
        assert image.digest() == before, options
    assert image.unlockers(key) == {0, 3}


@FORMATS
def test_only_active_keyslot_needs_force(setup, fmt):
    mon, image, key = setup
    before = image.digest()
    assert mon.amend("testdev", image, {"state": "inactive", "keyslot": 0}) == (
        "Attempt to erase the only active keyslot 0 which will erase all the data in the "
        "image irreversibly - refusing operation")
    assert image.digest() == before and image.unlockers(key) == {0}
    # force also lets an inactive slot be "erased" again
    assert mon.amend("testdev", image, {"state": "inactive", "keyslot": 6}, force=True) is None
    assert image.unlockers(key) == {0}
    assert mon.amend("testdev", image, {"state": "inactive", "keyslot": 0}, force=True) is None
    assert image.unlockers() == set() and mon.slots("testdev") == []


@FORMATS
def test_all_slots_in_use(setup, fmt):
    mon, image, key = setup
    for index in range(1, 8):
        secret = index % len(SECRET_IDS)
        assert mon.amend("testdev", image, add_key(secret)) is None
    assert mon.slots("testdev") == list(range(8))
    before = image.digest()
    assert mon.amend("testdev", image, add_key(1)) == \
        "Can't add a keyslot - all keyslots are in use"
    assert image.digest() == before
    assert image.qemu_slots(PASSPHRASES[5]) == list(range(8))
    # hunter0 now sits in slots 0 and 6: erasing by it takes both, leaves the rest
    assert mon.amend("testdev", image, {"state": "inactive",
                                        "old-secret": SECRET_IDS[0]}) is None
    assert mon.slots("testdev") == [1, 2, 3, 4, 5, 7]
    assert image.unlockers(key) == {1, 2, 3, 4, 5}


@FORMATS
def test_blockdev_amend_name_and_job_events(setup, fmt):
    """The stable name behaves as the x- alias; the events are QEMU's sequence."""
    mon, image, key = setup
    args = {"node-name": "testdev", "job-id": "j1",
            "options": image.amend_options(add_key(2))}
    assert mon.ok("blockdev-amend", args) == {}
    assert mon.job_statuses("j1") == ["created", "running", "waiting", "pending", "concluded"]
    [job] = mon.ok("query-jobs")
    assert job == {"id": "j1", "type": "amend", "status": "concluded",
                   "current-progress": 1, "total-progress": 1}
    mon.ok("job-dismiss", {"id": "j1"})
    assert mon.job_statuses("j1", "null") == ["null"]
    assert mon.ok("query-jobs") == []
    args["options"] = image.amend_options(add_key(2, keyslot=1))
    assert mon.ok("blockdev-amend", args) == {}
    assert mon.job_statuses("j1") == ["created", "running", "aborting", "concluded"]
    [job] = mon.ok("query-jobs")
    assert job["error"] == "Refusing to overwrite active keyslot 1 - please erase it first"
    mon.ok("job-dismiss", {"id": "j1"})
    assert image.unlockers(key) == {0, 2}
