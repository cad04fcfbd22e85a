"""SIGKILL during writes: what was acknowledged after a FLUSH, or with FUA, is on disk.

A libnbd client (under /usr/bin/python3) writes distinct 64 KiB blocks in
batches of eight requests in flight; after each batch it either flushes or
(every third batch) has written the batch with FUA, and only then prints the
batch as durable. The daemon is killed with SIGKILL in the middle; every
block reported durable must read back from the image file, and a qcow2
image must pass qemu-img check (leaked clusters allowed, no corruption).
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.exports_helpers import (LIBNBD_PYTHON, export_args, image_opts,
                                               luks_image, nbd_uri, plain_image,
                                               require_libnbd, rmtree, short_tmp,
                                               wait_for_socket)
from tests.oracles import run, run_qemu_img

pytestmark = pytest.mark.interop

BLOCK = 64 * 1024
SIZE = 256 << 20

WRITER = r"""
import sys, struct, nbd
BLOCK = 64 * 1024
h = nbd.NBD()
h.connect_uri(sys.argv[1])
blocks = h.get_size() // BLOCK
i = 0
batch = 0
try:
    while i + 8 <= blocks:
        fua = batch % 3 == 2
        flags = nbd.CMD_FLAG_FUA if fua else 0
        cookies = [h.aio_pwrite(struct.pack(">Q", j) * (BLOCK // 8), j * BLOCK, flags=flags)
                   for j in range(i, i + 8)]
        while h.aio_in_flight() > 0:
            h.poll(-1)
        for c in cookies:
            h.aio_command_completed(c)
        if not fua:
            h.flush()
        print("durable", i, i + 8, flush=True)
        i += 8
        batch += 1
    print("finished", flush=True)
except nbd.Error as e:
    print("error", e, flush=True)
"""


@pytest.mark.parametrize("fmt", ["luks", "qcow2", "raw"])
def test_sigkill_keeps_what_was_flushed(qmpd_daemon, fmt) -> None:
    require_libnbd()
    wd = short_tmp()
    try:
        path = os.path.join(wd, "disk.img")
        if fmt == "raw":
            plain_image(path, "raw", "256M")
            node = f"driver=raw,node-name=l0,file.driver=file,file.filename={path}"
            secret: list[str] = []
            passphrase = None
        else:
            luks_image(path, "pw0", size="256M", fmt=fmt)
            node = ("driver=luks,node-name=l0,key-secret=s0" if fmt == "luks" else
                    "driver=qcow2,node-name=l0,encrypt.format=luks,encrypt.key-secret=s0")
            node += f",file.driver=file,file.filename={path}"
            secret = ["--object", "secret,id=s0,data=pw0"]
            passphrase = "pw0"
        nbd_sock = os.path.join(wd, "nbd.sock")
        _qmp, proc = qmpd_daemon(*secret, "--blockdev", node, *export_args(nbd_sock),
                                 workdir=wd)
        wait_for_socket(nbd_sock)
        writer = subprocess.Popen([LIBNBD_PYTHON, "-c", WRITER, nbd_uri(nbd_sock)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        durable: list[tuple[int, int]] = []
        deadline = time.monotonic() + 60
        assert writer.stdout is not None
        while len(durable) < 40 and time.monotonic() < deadline:
            line = writer.stdout.readline()
            if not line or not line.startswith("durable"):
                break
            _, a, b = line.split()
            durable.append((int(a), int(b)))
        os.kill(proc.pid, signal.SIGKILL)       # mid-stream: the writer is still going
        proc.wait()
        rest, err = writer.communicate(timeout=60)
        for line in rest.splitlines():
            if line.startswith("durable"):
                _, a, b = line.split()
                durable.append((int(a), int(b)))
        assert durable, err
        assert "finished" not in rest, "the writer finished before the kill: make it longer"

        back = os.path.join(wd, "back.raw")
        run_qemu_img(["convert", *image_opts(path, passphrase, fmt if fmt != "raw" else "raw"),
                      "-O", "raw", back])
        with open(back, "rb") as f:
            for a, b in durable:
                for j in range(a, b):
                    f.seek(j * BLOCK)
                    assert f.read(BLOCK) == struct.pack(">Q", j) * (BLOCK // 8), \
                        f"block {j} was acknowledged durable but did not survive"
        if fmt == "qcow2":
            check = run(["qemu-img", "check", *image_opts(path, passphrase, fmt)], check=False)
            out = (check.stdout + check.stderr).decode(errors="replace")
            assert check.returncode in (0, 3), out      # 2 is corruption; 3 leaked clusters only
        Path(back).unlink()
    finally:
        rmtree(wd)
