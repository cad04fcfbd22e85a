#!/usr/bin/env python3
"""The Quick start: rotate the key of a LUKS disk while it is served over NBD.

Starts qmpd on a socket, creates an encrypted image with blockdev-create,
opens it, exports the decrypted disk over NBD and writes data through the
export; then, while an NBD client keeps reading, adds a new passphrase and
removes the old one. It shows the reader's longest wait, checks the data,
proves the new passphrase opens the image and the old one no longer does,
then stops the daemon. Every QMP message is printed as it crosses the wire.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nbd_client import NbdClient  # noqa: E402
from qmp_line_client import LineClient  # noqa: E402

#: ms of PBKDF2 per key slot (QEMU's default is 2000); tests make it short.
ITER_TIME = int(os.environ.get("QMPD_DEMO_ITER_TIME", "500"))


def start_daemon(workdir: Path) -> tuple[subprocess.Popen, str]:
    socket_path = str(workdir / "qmpd.sock")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qmpd",
            "--socket",
            socket_path,
            "--pidfile",
            str(workdir / "qmpd.pid"),
        ]
    )
    for _ in range(200):
        if (workdir / "qmpd.pid").exists():
            return proc, socket_path
        if proc.poll() is not None:
            sys.exit(f"qmpd exited with {proc.returncode}")
        time.sleep(0.05)
    proc.kill()
    sys.exit("qmpd did not start")


def step(title: str) -> None:
    print(f"\n### {title}")


def check(reply: dict) -> dict:
    if "error" in reply:
        sys.exit(f"unexpected error: {reply['error']}")
    return reply


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="qmpd-quickstart-") as tmp:
        workdir = Path(tmp)
        image = str(workdir / "disk.luks")
        proc, socket_path = start_daemon(workdir)
        try:
            qmp = LineClient(socket_path)
            check(qmp.execute("qmp_capabilities"))
            check(qmp.execute("query-version"))

            step("Secrets: the old and the new passphrase (values never echoed back)")
            check(
                qmp.execute(
                    "object-add", {"qom-type": "secret", "id": "old-pw", "data": "correct horse"}
                )
            )
            check(
                qmp.execute(
                    "object-add", {"qom-type": "secret", "id": "new-pw", "data": "battery staple"}
                )
            )

            step("Create a 64 MiB LUKS image (aes-256-xts-plain64, sha256) with blockdev-create")
            info = qmp.run_job(
                "blockdev-create",
                {"job-id": "mkfile", "options": {"driver": "file", "filename": image, "size": 0}},
            )
            assert "error" not in info, info
            check(
                qmp.execute(
                    "blockdev-add", {"driver": "file", "node-name": "disk-file", "filename": image}
                )
            )
            info = qmp.run_job(
                "blockdev-create",
                {
                    "job-id": "mkluks",
                    "options": {
                        "driver": "luks",
                        "file": "disk-file",
                        "size": 64 << 20,
                        "key-secret": "old-pw",
                        "iter-time": ITER_TIME,
                    },
                },
            )
            assert "error" not in info, info
            check(qmp.execute("blockdev-del", {"node-name": "disk-file"}))

            step("Open it with the old passphrase")
            check(
                qmp.execute(
                    "blockdev-add",
                    {
                        "driver": "luks",
                        "node-name": "disk",
                        "key-secret": "old-pw",
                        "file": {"driver": "file", "filename": image},
                    },
                )
            )

            step("Export the decrypted disk over NBD and write 4 MiB through the export")
            nbd_path = str(workdir / "nbd.sock")
            check(
                qmp.execute(
                    "nbd-server-start", {"addr": {"type": "unix", "data": {"path": nbd_path}}}
                )
            )
            check(
                qmp.execute(
                    "block-export-add",
                    {
                        "type": "nbd",
                        "id": "export0",
                        "node-name": "disk",
                        "name": "disk",
                        "writable": True,
                    },
                )
            )
            print(f"   clients: qemu-img info 'nbd+unix:///disk?socket={nbd_path}'")
            data = os.urandom(4 << 20)
            writer = NbdClient(nbd_path, "disk")
            writer.write(0, data)
            writer.flush()
            writer.close()

            reader = NbdClient(nbd_path, "disk")
            stop = threading.Event()
            longest = [0.0, 0]

            def keep_reading() -> None:
                while not stop.is_set():
                    start = time.perf_counter()
                    assert reader.read(0, 65536) == data[:65536]
                    longest[0] = max(longest[0], time.perf_counter() - start)
                    longest[1] += 1

            thread = threading.Thread(target=keep_reading)
            thread.start()

            step("Add the new passphrase (first free key slot) while the NBD client reads")
            info = qmp.run_job(
                "blockdev-amend",
                {
                    "job-id": "addkey",
                    "node-name": "disk",
                    "options": {
                        "driver": "luks",
                        "state": "active",
                        "new-secret": "new-pw",
                        "iter-time": ITER_TIME,
                    },
                },
            )
            assert "error" not in info, info

            step("Remove the old passphrase")
            info = qmp.run_job(
                "blockdev-amend",
                {
                    "job-id": "delkey",
                    "node-name": "disk",
                    "options": {"driver": "luks", "state": "inactive", "old-secret": "old-pw"},
                },
            )
            assert "error" not in info, info
            stop.set()
            thread.join()
            print(
                f"   the NBD reader made {longest[1]} reads meanwhile; longest wait "
                f"{longest[0] * 1000:.1f} ms"
            )
            assert reader.read(0, len(data)) == data, "data changed during the rotation"
            reader.close()
            print("   the 4 MiB read back identical after the rotation")
            # Stopping the server removes its exports (BLOCK_EXPORT_DELETED).
            check(qmp.execute("nbd-server-stop"))

            step("Key slots now")
            nodes = check(qmp.execute("query-named-block-nodes", {"flat": True}, quiet=True))[
                "return"
            ]
            luks = next(n for n in nodes if n["node-name"] == "disk")
            for slot, state in enumerate(luks["image"]["format-specific"]["data"]["slots"]):
                print(f"   slot {slot}: {'active' if state['active'] else 'inactive'}")
            check(qmp.execute("blockdev-del", {"node-name": "disk"}))

            step("The new passphrase opens the image; the old one no longer does")
            check(
                qmp.execute(
                    "blockdev-add",
                    {
                        "driver": "luks",
                        "node-name": "disk",
                        "key-secret": "new-pw",
                        "file": {"driver": "file", "filename": image},
                    },
                )
            )
            check(qmp.execute("blockdev-del", {"node-name": "disk"}))
            reply = qmp.execute(
                "blockdev-add",
                {
                    "driver": "luks",
                    "node-name": "disk",
                    "key-secret": "old-pw",
                    "file": {"driver": "file", "filename": image},
                },
            )
            assert reply["error"]["desc"] == "Invalid password, cannot unlock any keyslot", reply

            step("Stop the daemon")
            check(qmp.execute("quit"))
            qmp.close()
            proc.wait(timeout=10)
            print(
                f"\nqmpd exited with {proc.returncode}; socket removed: {not os.path.exists(socket_path)}"
            )
            return proc.returncode
        finally:
            if proc.poll() is None:
                proc.kill()


if __name__ == "__main__":
    sys.exit(main())
