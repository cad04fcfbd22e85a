"""Limits with clear errors, and clients that stall or never read.

Each limit is tripped on one connection while a bystander connection keeps
getting its answers quickly.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time

import pytest

from tests.reliability.launch import start_limited, stop
from tests.qmp_client import ConnectionClosed, QmpClient
from tests.reliability.qmp_wire import rss_kib

#: How long a bystander's query-version may take while others misbehave
#: (generous: two shared cores; an idle daemon answers in well under 1 ms).
BYSTANDER_BUDGET = 0.5


@pytest.fixture
def limited(tmp_path_factory):
    """``start(**limits) -> socket path`` of a daemon with small limits."""
    procs = []
    workdir = tempfile.mkdtemp(prefix="qmpd-lim-")

    def start(**limits) -> tuple[str, object]:
        path = os.path.join(workdir, f"l{len(procs)}.sock")
        proc = start_limited(path, os.path.join(workdir, f"l{len(procs)}.log"), **limits)
        procs.append(proc)
        return path, proc

    yield start
    for proc in procs:
        stop(proc)


def _quick(q: QmpClient) -> float:
    start = time.monotonic()
    assert q.ok("query-version")["qemu"]["major"] == 7
    return time.monotonic() - start


def _error_then_alive(q: QmpClient, data: bytes, expected: str) -> None:
    q.send(data)
    reply = q.reply(timeout=60)
    assert reply == {"error": {"class": "GenericError", "desc": expected}}, reply
    # The rest of the message is lexed as new input and costs more errors,
    # as in QEMU; a resync byte and a command show the session still serves.
    q.send(b"\xff\n" + json.dumps({"execute": "query-version", "id": "after"}).encode())
    while True:
        msg = q.reply(timeout=60)
        if msg.get("id") == "after":
            assert "return" in msg
            return
        assert "error" in msg, msg


def test_nesting_limit(shared_qmpd_daemon):
    with QmpClient(shared_qmpd_daemon()) as q:
        q.negotiate()
        _error_then_alive(q, b"[" * 1025 + b"]" * 1025, "JSON nesting depth limit exceeded")
        # 1000 deep is still accepted (an id may be any JSON value).
        q.send(b'{"execute": "query-version", "id": ' + b"[" * 1000 + b"]" * 1000 + b"}")
        line = q.recv_line()
        assert line.startswith(b'{"return": {"qemu"') and line.count(b"[") == 1000, line[:100]


def test_token_count_limit(shared_qmpd_daemon):
    with QmpClient(shared_qmpd_daemon()) as q:
        q.negotiate()
        _error_then_alive(q, b"[" + b"1," * (1 << 20) + b"1]", "JSON token count limit exceeded")


def test_token_size_limit(shared_qmpd_daemon):
    with QmpClient(shared_qmpd_daemon(), timeout=60) as q, QmpClient(shared_qmpd_daemon()) as other:
        q.negotiate()
        other.negotiate()
        q.send(b'{"execute": "query-version", "id": "' + b"x" * ((64 << 20) + 16))
        reply = q.reply(timeout=60)
        assert reply == {"error": {"class": "GenericError",
                                   "desc": "JSON token size limit exceeded"}}, reply
        assert _quick(other) < BYSTANDER_BUDGET


def test_message_bytes_limit_closes_cleanly(limited):
    """An unfinished message past max_message_bytes: one clear error, then close."""
    path, proc = limited(max_message_bytes=1 << 20)
    with QmpClient(path) as q, QmpClient(path) as other:
        q.negotiate()
        other.negotiate()
        try:
            q.send(b'{"execute": "query-version", "id": [' + b'"abc", ' * 400_000)
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = q.reply(timeout=30)
        assert reply["error"]["desc"] == "JSON token size limit exceeded", reply
        with pytest.raises((ConnectionClosed, ConnectionResetError)):
            q.reply(timeout=30)
        assert _quick(other) < BYSTANDER_BUDGET
    assert proc.poll() is None


def test_connection_limit(limited, figures):
    path, proc = limited(max_connections=4)
    held = [QmpClient(path).negotiate() for _ in range(4)]
    extra = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    extra.settimeout(10)
    extra.connect(path)
    data = b""
    while True:
        chunk = extra.recv(4096)
        if not chunk:
            break
        data += chunk
    extra.close()
    # Refused with a QMP error instead of a greeting, then closed.
    assert json.loads(data) == {"error": {"class": "GenericError", "desc":
                                          "Too many QMP connections (at most 4)"}}, data
    for q in held:
        assert _quick(q) < BYSTANDER_BUDGET
    held.pop().close()
    time.sleep(0.2)
    with QmpClient(path) as again:  # a freed place is usable again
        again.negotiate()
    figures("connection limit: the 5th of max_connections=4 gets", data.decode().strip())
    for q in held:
        q.close()


def test_non_reading_client_is_cut_loose(limited, figures):
    """Replies queue up to max_queued_bytes for a client that never reads; then it goes."""
    path, proc = limited(max_queued_bytes=1 << 20)
    other = QmpClient(path).negotiate()
    hog = QmpClient(path).negotiate()
    hog.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    request = b'{"execute": "query-qmp-schema"}'
    rss_before = rss_kib(proc.pid)
    sent = 0
    worst = 0.0
    deadline = time.monotonic() + 60
    hog.sock.settimeout(0.05)
    cut = False
    while time.monotonic() < deadline:
        try:
            hog.sock.sendall(request * 20)
            sent += 20
        except (TimeoutError, socket.timeout):
            pass
        except (BrokenPipeError, ConnectionResetError):
            cut = True
            break
        worst = max(worst, _quick(other))
        # The daemon closes the hog: its receive side sees the end eventually.
        if _cut_loose(hog):
            cut = True
            break
    assert cut, "a client that never reads was never disconnected"
    assert worst < BYSTANDER_BUDGET, worst
    rss_after = rss_kib(proc.pid)
    figures("non-reading client: requests sent before cut loose", sent)
    figures("non-reading client: bystander worst latency (ms)", round(worst * 1000, 1))
    figures("non-reading client: daemon RSS before/after (KiB)", f"{rss_before}/{rss_after}")
    assert rss_after < rss_before + 64 * 1024
    assert _quick(other) < BYSTANDER_BUDGET
    other.close()
    hog.close()


def _cut_loose(q: QmpClient) -> bool:
    """True once the daemon has closed ``q``: writing to it fails (whitespace is harmless)."""
    try:
        q.sock.send(b" ")
    except (BrokenPipeError, ConnectionResetError):
        return True
    except (TimeoutError, socket.timeout, BlockingIOError):
        pass
    return False


def test_events_for_a_non_reading_session_are_bounded(limited, figures):
    """Events queue per session like replies: a session that never reads is cut loose."""
    path, proc = limited(max_queued_bytes=64 << 10)
    workdir = tempfile.mkdtemp(prefix="qmpd-ev-")
    deaf = QmpClient(path).negotiate()
    deaf.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    with QmpClient(path) as q:
        q.negotiate()
        jobs = 0
        while not _cut_loose(deaf) and jobs < 2000:
            job = f"j{jobs}"
            q.ok("blockdev-create", {"job-id": job, "options": {
                "driver": "file", "filename": os.path.join(workdir, "f"), "size": 0}})
            q.wait_job(job)
            q.events.clear()
            jobs += 1
        assert jobs < 2000, "the deaf session was never cut loose"
        figures("events: jobs run until a deaf session (64 KiB queue) was cut loose", jobs)
        assert _quick(q) < BYSTANDER_BUDGET
    deaf.close()


def test_stuck_clients_never_delay_others(shared_qmpd_daemon, scale, figures):
    """Half a message then silence; connected but never negotiating; never reading."""
    path = shared_qmpd_daemon()
    stuck = []
    for i in range(scale(20, 200)):
        q = QmpClient(path)
        if i % 3 == 0:
            q.send(b'{"execute": "qmp_capabilities", "argum')
        elif i % 3 == 1:
            q.negotiate()
            q.send(b'{"execute": "query-version"}' * 5)  # never read
        stuck.append(q)
    raw = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(10)]
    for s in raw:
        s.connect(path)  # never read the greeting, never send
    with QmpClient(path) as q:
        q.negotiate()
        worst = max(_quick(q) for _ in range(200))
    figures("stuck clients held / worst bystander latency (ms)",
            f"{len(stuck) + len(raw)} / {round(worst * 1000, 1)}")
    assert worst < BYSTANDER_BUDGET
    for q in stuck:
        q.close()
    for s in raw:
        s.close()
