#!/usr/bin/env python3
"""Rotate the passphrase of an open LUKS node on a running qmpd, with qemu.qmp.

    python examples/rotate_key.py SOCKET NODE --old-secret ID --new-passphrase-file FILE

Adds the new passphrase in a free key slot, then erases every slot that
holds the old one. The passphrase travels as a secret object (object-add),
never on this script's command line. Works the same against
qemu-storage-daemon 7.2 with --command x-blockdev-amend (LUKS1 only).

On a LUKS2 image (cryptsetup's default format; only qmpd opens it over
QMP) ``--pbkdf argon2id --pbkdf-memory KIB --pbkdf-parallel N`` choose the
new keyslot's KDF (qmpd's extension; LUKS2's default is argon2id).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from qemu.qmp import EventListener, ExecuteError, QMPClient


async def run_job(client: QMPClient, command: str, arguments: dict) -> None:
    """Start a job and wait for it; raise with the job's error if it failed."""
    job_id = arguments["job-id"]
    listener = EventListener(("JOB_STATUS_CHANGE",))
    with client.listen(listener):
        await client.execute(command, arguments)
        async for event in listener:
            if event["data"] == {"id": job_id, "status": "concluded"}:
                break
    info = next(j for j in await client.execute("query-jobs") if j["id"] == job_id)
    await client.execute("job-dismiss", {"id": job_id})
    if "error" in info:
        raise RuntimeError(f"{command} failed: {info['error']}")


async def rotate(
    socket_path: str,
    node: str,
    old_secret: str,
    new_passphrase: str,
    command: str,
    iter_time: int | None,
    kdf: dict,
) -> None:
    client = QMPClient("rotate-key")
    await client.connect(socket_path)
    try:
        await client.execute(
            "object-add", {"qom-type": "secret", "id": "rotate-new", "data": new_passphrase}
        )
        add = {
            "driver": "luks",
            "state": "active",
            "new-secret": "rotate-new",
            "secret": old_secret,
        }
        if iter_time:
            add["iter-time"] = iter_time
        add.update(kdf)
        await run_job(client, command, {"job-id": "rotate-add", "node-name": node, "options": add})
        await run_job(
            client,
            command,
            {
                "job-id": "rotate-erase",
                "node-name": node,
                "options": {"driver": "luks", "state": "inactive", "old-secret": old_secret},
            },
        )
        print(f"{node}: new passphrase added, old one erased")
    finally:
        try:
            await client.execute("object-del", {"id": "rotate-new"})
        except ExecuteError:
            pass
        await client.disconnect()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("socket")
    parser.add_argument("node", help="node-name of an open luks node")
    parser.add_argument(
        "--old-secret", required=True, help="id of the secret holding the current passphrase"
    )
    parser.add_argument("--new-passphrase-file", required=True)
    parser.add_argument("--iter-time", type=int, help="KDF milliseconds for the new slot")
    parser.add_argument(
        "--pbkdf",
        choices=["pbkdf2", "argon2i", "argon2id"],
        help="the new slot's KDF (LUKS2; LUKS1 has pbkdf2 only)",
    )
    parser.add_argument("--pbkdf-memory", type=int, help="Argon2 memory in KiB (LUKS2)")
    parser.add_argument("--pbkdf-parallel", type=int, help="Argon2 lanes (LUKS2)")
    parser.add_argument("--command", default="blockdev-amend", help="x-blockdev-amend for qsd 7.2")
    args = parser.parse_args()
    with open(args.new_passphrase_file) as f:
        new_passphrase = f.read().rstrip("\n")
    kdf = {
        name: value
        for name, value in (
            ("pbkdf", args.pbkdf),
            ("pbkdf-memory", args.pbkdf_memory),
            ("pbkdf-parallel", args.pbkdf_parallel),
        )
        if value is not None
    }
    try:
        asyncio.run(
            rotate(
                args.socket,
                args.node,
                args.old_secret,
                new_passphrase,
                args.command,
                args.iter_time,
                kdf,
            )
        )
    except (ExecuteError, RuntimeError) as exc:
        print(f"rotate_key: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
