"""Online key rotation of an exported disk: nbdcopy keeps writing while the keys change.

A key is added (x-blockdev-amend, iter-time 1000: about a second of
PBKDF2) and then the old one erased, while nbdcopy writes 64 MiB of random
data through the export again and again. Afterwards the data reads back
identical through the new passphrase, qemu-io and cryptsetup accept the new
passphrase and refuse the old one.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.integration.exports_helpers import (Qmp, export_args, image_opts, luks_image,
                                               nbd_uri, random_file, rmtree, short_tmp,
                                               wait_for_socket)
from tests.oracles import cryptsetup_unlocks, require, run, run_qemu_img
from tests.processes import stop

pytestmark = pytest.mark.interop

MiB = 1 << 20


@pytest.mark.parametrize("fmt", ["luks", pytest.param("qcow2", marks=pytest.mark.soak)])
def test_rotation_while_nbdcopy_writes(qmpd_daemon, fmt) -> None:
    require("nbdcopy")
    wd = short_tmp()
    try:
        path = luks_image(os.path.join(wd, "disk.img"), "old-pass", size="80M", fmt=fmt)
        if fmt == "luks":
            blockdev = "driver=luks,node-name=l0,key-secret=s0"
        else:
            blockdev = "driver=qcow2,node-name=l0,encrypt.format=luks,encrypt.key-secret=s0"
        blockdev += f",file.driver=file,file.filename={path}"
        nbd_sock = os.path.join(wd, "nbd.sock")
        qmp_sock, proc = qmpd_daemon(
            "--object", "secret,id=s0,data=old-pass", "--object", "secret,id=s1,data=new-pass",
            "--blockdev", blockdev,
            *export_args(nbd_sock), workdir=wd)
        wait_for_socket(nbd_sock)
        src = os.path.join(wd, "src.raw")
        data = random_file(src, 64 * MiB, seed=11)
        qmp = Qmp(qmp_sock)

        def amend(job: str, options: dict) -> None:
            if fmt == "qcow2":
                options = {"driver": "qcow2", "encrypt": {
                    "format": "luks", **{k: v for k, v in options.items() if k != "driver"}}}
            qmp.ok("x-blockdev-amend", {"job-id": job, "node-name": "l0", "options": options})

        def copy() -> subprocess.Popen:
            return subprocess.Popen(["nbdcopy", "--connections=4", src, nbd_uri(nbd_sock)],
                                    stderr=subprocess.PIPE)

        writer = copy()
        amend("add", {"driver": "luks", "state": "active", "new-secret": "s1",
                      "iter-time": 1000})
        phase = "add"
        while True:          # a writer is always running until the erase has concluded
            if writer.poll() is not None:
                assert writer.returncode == 0, writer.stderr.read().decode()
                writer = copy()
            done = [e for e in qmp.events if e["event"] == "JOB_STATUS_CHANGE"
                    and e["data"] == {"id": phase, "status": "concluded"}]
            if done:
                qmp.events.clear()
                jobs = {j["id"]: j for j in qmp.ok("query-jobs")}
                assert "error" not in jobs[phase], jobs[phase]
                qmp.ok("job-dismiss", {"id": phase})
                if phase == "erase":
                    break
                phase = "erase"
                amend("erase", {"driver": "luks", "state": "inactive", "old-secret": "s0"})
                continue
            try:
                qmp.events.append(qmp.recv(0.05))
            except TimeoutError:
                pass
        assert writer.wait(120) == 0, writer.stderr.read().decode()
        qmp.close()
        stop(proc)
        assert proc.returncode == 0

        back = os.path.join(wd, "back.raw")
        run_qemu_img(["convert", *image_opts(path, "new-pass", fmt), "-O", "raw", back])
        assert Path(back).read_bytes()[:64 * MiB] == data
        old = run(["qemu-io", "-r", *image_opts(path, "old-pass", fmt), "-c", "read 0 512"],
                  check=False)
        assert old.returncode != 0
        assert b"Invalid password, cannot unlock any keyslot" in old.stderr + old.stdout
        if fmt == "luks":
            require("cryptsetup")
            assert cryptsetup_unlocks(path, b"new-pass")
            assert not cryptsetup_unlocks(path, b"old-pass")
    finally:
        rmtree(wd)
