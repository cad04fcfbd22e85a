"""Hostile QMP input: fuzzing, limits, stuck and non-reading clients.

Every fuzzed message is followed by a *resync*: the byte 0xFF (a lexical
error wherever the lexer is, so QEMU's streamer throws away whatever was
half-collected) and then a ``query-version`` with a fresh id. Everything up
to that reply must be a QMP reply object (``return`` or ``error``) or an
event; the reply to the sync proves the connection still serves.
"""

from __future__ import annotations

import json
import random
import socket

from hypothesis import HealthCheck, given, settings, strategies as st

from qmpd.schema import Schema
from tests.reliability import fuzz_inputs
from tests.qmp_client import ConnectionClosed, QmpClient
from tests.reliability.qmp_wire import rss_kib

RESYNC = b"\xff\n"


class FuzzSession:
    """One negotiated connection that is fed hostile bytes and resynced."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sent = 0
        self.replies = 0
        self.reconnects = 0
        self._n = 0
        self.q = QmpClient(path, timeout=20).negotiate()

    def feed(self, data: bytes) -> list[dict]:
        self._n += 1
        sync_id = f"sync-{self._n}"
        try:
            self.q.send(data + RESYNC + json.dumps(
                {"execute": "query-version", "id": sync_id}).encode())
            seen = []
            while True:
                msg = self.q.recv()
                assert isinstance(msg, dict), msg
                if "event" in msg:
                    continue
                assert ("return" in msg) != ("error" in msg), msg
                if "error" in msg:
                    assert set(msg["error"]) == {"class", "desc"}, msg
                    assert isinstance(msg["error"]["desc"], str) and msg["error"]["desc"]
                if msg.get("id") == sync_id:
                    assert "return" in msg and msg["return"]["qemu"]["major"] == 7, msg
                    break
                seen.append(msg)
        except (ConnectionClosed, ConnectionResetError, BrokenPipeError):
            # Allowed only where the stream cannot be resynchronised; the
            # daemon must still accept a new connection.
            self.reconnects += 1
            self.q.close()
            self.q = QmpClient(self.path, timeout=20).negotiate()
            seen = []
        self.sent += 1
        self.replies += len(seen)
        return seen

    def close(self) -> None:
        self.q.close()


def _daemon_pid(path: str) -> int:
    """The pid of the process listening on ``path`` (SO_PEERCRED)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    import struct
    creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    s.close()
    return struct.unpack("3i", creds)[0]


def test_seeded_mutator_fuzz_keeps_serving(qmpd_daemon, scale, figures):
    """Mutated, truncated, invalid UTF-8 and special messages on one connection."""
    path, proc = qmpd_daemon()
    bystander = QmpClient(path).negotiate()
    rng = random.Random(20260601)
    count = scale(2000, 60000)
    session = FuzzSession(path)
    for data in fuzz_inputs.SPECIALS:
        session.feed(data)
    session.feed(fuzz_inputs.huge_string_message(8 << 20))
    rss_before = rss_kib(proc.pid)
    for _ in range(count):
        session.feed(fuzz_inputs.mutate(rng, rng.choice(fuzz_inputs.SEEDS + fuzz_inputs.SPECIALS)))
    rss_after = rss_kib(proc.pid)
    assert bystander.ok("query-version")["qemu"]["major"] == 7
    assert proc.poll() is None
    figures("mutator: messages fuzzed (one connection)", session.sent)
    figures("mutator: error/return replies checked", session.replies)
    figures("mutator: reconnects needed", session.reconnects)
    figures("mutator: daemon RSS before/after (KiB)", f"{rss_before}/{rss_after}")
    # After the 8 MiB string warmed the buffers, fuzzing grows nothing.
    assert rss_after < rss_before + 16 * 1024, (rss_before, rss_after)
    assert session.reconnects == 0
    session.close()
    bystander.close()


def test_every_argument_of_every_command_with_wrong_types(qmpd_daemon, figures):
    path, proc = qmpd_daemon()
    session = FuzzSession(path)
    messages = fuzz_inputs.wrong_type_messages(Schema.load())
    errors = 0
    for data in messages:
        q = session.q
        q.send(data)
        reply = q.reply()
        assert ("return" in reply) != ("error" in reply), reply
        assert reply["id"] == json.loads(data)["id"]
        errors += "error" in reply
    figures("wrong-type arguments sent (every member of every command)", len(messages))
    # A handful of wrong values are accepted where QEMU accepts them
    # (e.g. any JSON for 'id'); nearly all must be refused.
    assert errors > len(messages) * 0.9
    assert proc.poll() is None
    session.close()


_json = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20)

_commands = st.sampled_from(sorted(set(Schema.load().commands) - fuzz_inputs.EXCLUDED))


@st.composite
def _messages(draw) -> bytes:
    msg = draw(st.dictionaries(
        st.sampled_from(["execute", "exec-oob", "arguments", "id", "control", "x"]), _json,
        max_size=3))
    if draw(st.booleans()):
        msg["execute"] = draw(_commands)
    if draw(st.booleans()):
        msg["arguments"] = draw(st.dictionaries(st.text(max_size=12), _json, max_size=4))
    text = json.dumps(msg, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    cut = draw(st.integers(0, len(text)))
    return text if draw(st.integers(0, 4)) else text[:cut]


def test_hypothesis_messages(shared_qmpd_daemon, soak, figures):
    session = FuzzSession(shared_qmpd_daemon())
    pid = _daemon_pid(session.path)

    @settings(max_examples=3000 if soak else 300, deadline=None, derandomize=not soak,
              suppress_health_check=list(HealthCheck))
    @given(_messages())
    def one(data: bytes) -> None:
        session.feed(data)

    rss_before = rss_kib(pid)
    one()
    figures("hypothesis: messages fuzzed", session.sent)
    figures("hypothesis: daemon RSS before/after (KiB)", f"{rss_before}/{rss_kib(pid)}")
    assert session.reconnects == 0
    session.close()
