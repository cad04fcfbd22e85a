"""Record how qemu-storage-daemon 7.2 answers the byte sequences of scenarios.py.

    .venv/bin/python -m tests.nbd.record_qsd_nbd [OUT.json]

Each scenario runs against a fresh qsd exporting two copies of the scenario
image; after each send the recorder collects the reply until the line has
been quiet for a moment (or the server hung up). The result is test data
for test_qsd_wire.py, which replays the sends against NbdServer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.nbd import scenarios
from tests.nbd.certs import make_certs
from tests.nbd.wire import RawClient
from tests.processes import accepts, stop

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "data" / "nbd" / "qsd_wire.json"


def write_image(path: Path) -> None:
    data = scenarios.image()
    with open(path, "wb") as f:
        f.write(data[:scenarios.ZEROES_END])  # the written zeroes are data
        f.truncate(scenarios.IMAGE_SIZE)


def start_qsd(workdir: Path, *, tls: bool = False) -> tuple[subprocess.Popen, str]:
    sock = str(workdir / "nbd.sock")
    args = ["qemu-storage-daemon"]
    for i, exp in enumerate(scenarios.EXPORTS):
        img = workdir / f"{exp['name']}.img"
        write_image(img)
        if "align" in exp:
            args += ["--blockdev", f"driver=file,node-name=raw{i},filename={img}",
                     "--blockdev", (f"driver=blkdebug,node-name=f{i},align={exp['align']},"
                                    f"image=raw{i}")]
        else:
            args += ["--blockdev", f"driver=file,node-name=f{i},filename={img}"]
    server = f"addr.type=unix,addr.path={sock}"
    if tls:
        certs = make_certs(workdir / "certs")
        args += ["--object", f"tls-creds-x509,id=tls0,dir={certs},endpoint=server"]
        server += ",tls-creds=tls0"
    args += ["--nbd-server", server]
    for i, exp in enumerate(scenarios.EXPORTS):
        spec = f"type=nbd,id=e{i},node-name=f{i},name={exp['name']}"
        spec += ",writable=" + ("on" if exp["writable"] else "off")
        spec += ",allocation-depth=" + ("on" if exp["allocation_depth"] else "off")
        if exp["description"]:
            spec += f",description={exp['description']}"
        args += ["--export", spec]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while not accepts(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"qsd did not start: {proc.stderr.read().decode()}")
        time.sleep(0.02)
    return proc, sock


def record_scenario(sends: list[bytes], *, tls: bool = False) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="qsd-nbd-") as tmp:
        proc, sock = start_qsd(Path(tmp), tls=tls)
        try:
            client = RawClient(sock)
            steps = [{"send": "", "recv": client.recv_quiet().hex(), "closed": client.closed}]
            for data in sends:
                if client.closed:
                    break
                client.send(data)
                steps.append({"send": data.hex(), "recv": client.recv_quiet().hex(),
                              "closed": client.closed})
            client.close()
        finally:
            stop(proc)
    return steps


def handshake_timeout() -> float:
    """Seconds until qsd hangs up on a client that never negotiates."""
    with tempfile.TemporaryDirectory(prefix="qsd-nbd-") as tmp:
        proc, sock = start_qsd(Path(tmp))
        try:
            client = RawClient(sock)
            start = time.monotonic()
            client.recv_quiet(quiet=30, limit=30)
            return round(time.monotonic() - start, 1)
        finally:
            stop(proc)


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    version = subprocess.run(["qemu-storage-daemon", "--version"], capture_output=True,
                             text=True, check=True).stdout.splitlines()[0]
    recorded = {name: record_scenario(sends) for name, sends in scenarios.SCENARIOS.items()}
    recorded_tls = {name: record_scenario(sends, tls=True)
                    for name, sends in scenarios.TLS_SCENARIOS.items()}
    data = {"qsd_version": version, "handshake_timeout_s": handshake_timeout(),
            "scenarios": recorded, "tls_scenarios": recorded_tls}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"{len(recorded) + len(recorded_tls)} scenarios from {version} -> {out}")


if __name__ == "__main__":
    os.environ.setdefault("LC_ALL", "C")
    main()
