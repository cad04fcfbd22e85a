"""The tests' one way to start qemu-storage-daemon: a QMP monitor on a unix
socket plus the caller's arguments, returned once the socket exists.

Its output goes to ``log_path`` (or nowhere); a daemon that exits or never
opens its socket raises RuntimeError with that output. Talk to it with
tests/qmp_client.py; stop it with tests/processes.py's ``stop``.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Sequence


def start_qsd(qmp_sock: str, args: Sequence[str] = (), *, log_path: str | None = None,
              timeout: float = 20.0, binary: str = "qemu-storage-daemon") -> subprocess.Popen:
    argv = [binary, "--chardev", f"socket,id=c0,path={qmp_sock},server=on,wait=off",
            "--monitor", "chardev=c0", *args]
    if log_path is None:
        log_file = tempfile.TemporaryFile()
    else:
        log_file = open(log_path, "w+b")
    with log_file:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not os.path.exists(qmp_sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                log_file.seek(0)
                output = log_file.read().decode(errors="replace").strip()
                raise RuntimeError(f"qemu-storage-daemon did not open its QMP socket: {output}")
            time.sleep(0.01)
    return proc
