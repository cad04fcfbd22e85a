"""Real QMP clients drive a qmpd subprocess unchanged: qemu.qmp (async and
legacy) and qmp-shell."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest


def _run_asyncio(coro):
    return asyncio.run(coro)


def test_async_qmpclient_with_event_listener(qmpd_daemon):
    from qemu.qmp import EventListener, QMPClient

    sock, proc = qmpd_daemon()

    async def scenario():
        client = QMPClient("test")
        await client.connect(sock)
        try:
            assert client.greeting is not None
            version = await client.execute("query-version")
            assert version["qemu"] == {"major": 7, "minor": 2, "micro": 0}
            assert version["package"].startswith("qmpd ")
            names = {c["name"] for c in await client.execute("query-commands")}
            assert {"blockdev-amend", "x-blockdev-amend", "query-qmp-schema"} <= names
            await client.execute("object-add", {"qom-type": "secret", "id": "s0", "data": "pw"})
            listener = EventListener(("JOB_STATUS_CHANGE",))
            with client.listen(listener):
                await client.execute("blockdev-create", {"job-id": "j0", "options": {
                    "driver": "file", "filename": os.path.join(os.path.dirname(sock), "f.img"),
                    "size": 1 << 20}})
                statuses = []
                while not statuses or statuses[-1] != "concluded":
                    event = await asyncio.wait_for(listener.get(), 10)
                    statuses.append(event["data"]["status"])
            assert statuses == ["created", "running", "waiting", "pending", "concluded"]
            await client.execute("job-dismiss", {"id": "j0"})
        finally:
            await client.disconnect()

    _run_asyncio(scenario())


def test_async_qmpclient_error_is_raised_with_qemu_text(qmpd_daemon):
    from qemu.qmp import ExecuteError, QMPClient

    sock, _ = qmpd_daemon()

    async def scenario():
        client = QMPClient("test")
        await client.connect(sock)
        try:
            with pytest.raises(ExecuteError) as info:
                await client.execute("object-del", {"id": "nothing"})
            assert info.value.error.error.desc == "object 'nothing' not found"
            # The id qemu.qmp generates is echoed, or it would never match the reply.
            assert await client.execute("query-jobs") == []
        finally:
            await client.disconnect()

    _run_asyncio(scenario())


def test_legacy_sync_client(qmpd_daemon):
    from qemu.qmp.legacy import QEMUMonitorProtocol

    sock, _ = qmpd_daemon()
    qmp = QEMUMonitorProtocol(sock)
    greeting = qmp.connect(negotiate=True)
    assert greeting["QMP"]["capabilities"] == ["oob"]
    assert qmp.cmd_raw("query-version")["return"]["qemu"]["major"] == 7
    reply = qmp.cmd_raw("object-add", {"qom-type": "secret", "id": "s0"})
    assert reply["error"]["desc"] == "Either 'file' or 'data' must be provided"
    qmp.cmd("object-add", **{"qom-type": "secret", "id": "s0", "data": "x"})
    assert qmp.cmd("query-jobs") == []
    qmp.close()


def test_qmp_shell_session(qmpd_daemon):
    sock, _ = qmpd_daemon()
    shell = os.path.join(os.path.dirname(sys.executable), "qmp-shell")
    script = "query-version\nobject-add qom-type=secret id=s0 data=abc\nquery-jobs\nbogus-cmd\n"
    out = subprocess.run([shell, sock], input=script, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "Connected to QEMU 7.2.0" in out.stdout
    assert '"package": "qmpd' in out.stdout
    assert '{"return": []}' in out.stdout
    assert "The command bogus-cmd has not been found" in out.stdout
    assert "abc" not in out.stdout.replace("data=abc", "")


def test_socket_mode_pidfile_and_sigterm(qmpd_daemon, tmp_path):
    workdir = tmp_path
    pidfile = str(workdir / "qmpd.pid")
    sock, proc = qmpd_daemon("--pidfile", pidfile)
    deadline = time.monotonic() + 10
    while not os.path.exists(pidfile) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert int(open(pidfile).read()) == proc.pid
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    client = socket.socket(socket.AF_UNIX)
    client.connect(sock)
    f = client.makefile("rb")
    f.readline()
    client.sendall(b'{"execute": "qmp_capabilities"}\n')
    assert b'"return"' in f.readline()
    proc.send_signal(signal.SIGTERM)
    event = f.readline()
    assert b'"SHUTDOWN"' in event and b'"host-signal"' in event
    assert proc.wait(10) == 0
    assert not os.path.exists(sock)
    assert not os.path.exists(pidfile)


def test_stale_socket_replaced_and_other_files_refused(tmp_path):
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()  # a socket file nobody listens on
    proc = subprocess.Popen([sys.executable, "-m", "qmpd", "--socket", str(stale)])
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                c = socket.socket(socket.AF_UNIX)
                c.connect(str(stale))
                assert c.makefile("rb").readline().startswith(b'{"QMP"')
                c.close()
                break
            except OSError:
                time.sleep(0.05)
        else:
            pytest.fail("qmpd did not take over the stale socket")
    finally:
        proc.terminate()
        proc.wait(10)
    regular = tmp_path / "regular"
    regular.write_text("keep me")
    out = subprocess.run([sys.executable, "-m", "qmpd", "--socket", str(regular)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert "not a socket" in out.stderr
    assert regular.read_text() == "keep me"


def test_many_clients_at_once_each_its_own_session(qmpd_daemon):
    sock, _ = qmpd_daemon()
    clients = []
    for _ in range(20):
        c = socket.socket(socket.AF_UNIX)
        c.connect(sock)
        f = c.makefile("rb")
        f.readline()
        clients.append((c, f))
    # Only the first negotiates: the others still get the negotiation error.
    clients[0][0].sendall(b'{"execute": "qmp_capabilities"}{"execute": "query-version", "id": 1}')
    assert b'"return": {}' in clients[0][1].readline()
    assert b'"id": 1' in clients[0][1].readline()
    for c, f in clients[1:]:
        c.sendall(b'{"execute": "query-version"}')
        assert b"Expecting capabilities negotiation" in f.readline()
    for c, _ in clients:
        c.close()


def test_stuck_client_does_not_delay_others(qmpd_daemon):
    sock, _ = qmpd_daemon()
    stuck = socket.socket(socket.AF_UNIX)
    stuck.connect(sock)
    stuck.sendall(b'{"execute": "qmp_capa')  # half a message, then silence
    other = socket.socket(socket.AF_UNIX)
    other.connect(sock)
    other.settimeout(5)
    f = other.makefile("rb")
    f.readline()
    other.sendall(b'{"execute": "qmp_capabilities"}{"execute": "query-version"}')
    assert b"return" in f.readline()
    assert b"qemu" in f.readline()
    stuck.close()
    other.close()


def test_cli_object_and_version(tmp_path):
    out = subprocess.run([sys.executable, "-m", "qmpd", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "7.2.0" in out.stdout
    out = subprocess.run([sys.executable, "-m", "qmpd", "--socket", str(tmp_path / "s"),
                          "--object", "secret,id=s0"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert "Either 'file' or 'data' must be provided" in out.stderr
