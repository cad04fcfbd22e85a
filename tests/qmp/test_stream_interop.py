"""qmp/stream against qemu-storage-daemon 7.2: same bytes in, same errors out.

Each case sends a byte stream to qsd's QMP monitor, then 0xFF and a newline
(which reset QEMU's lexer and streamer from any state) and a marked
query-version.  Every reply before the marked one belongs to the case, one
per item that QEMU's streamer emitted; our parser must predict them all:
parse errors word for word, non-objects as "QMP input must be a JSON
object", objects as anything but a JSON error.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import time

import pytest

from qmpd.qmp.stream import JSONStreamParser, StreamError
from tests.oracles import require

pytestmark = pytest.mark.interop

RESYNC = b"\xff\n"


class QsdMonitor:
    """One negotiated QMP connection to a qemu-storage-daemon."""

    def __init__(self, directory) -> None:
        path = os.path.join(directory, "qmp.sock")
        self.process = subprocess.Popen(
            [require("qemu-storage-daemon"),
             "--chardev", f"socket,id=c0,path={path},server=on,wait=off",
             "--monitor", "chardev=c0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not os.path.exists(path):
            assert time.monotonic() < deadline, "qemu-storage-daemon did not start"
            time.sleep(0.02)
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.sock.settimeout(60)
        self.reader = self.sock.makefile("rb")
        self.reader.readline()  # greeting
        self.sock.sendall(b'{"execute": "qmp_capabilities"}\n')
        assert json.loads(self.reader.readline()) == {"return": {}}
        self.cases = 0

    def replies(self, payload: bytes) -> list[dict]:
        self.cases += 1
        mark = f"case-{self.cases}"
        self.sock.sendall(payload + RESYNC + json.dumps(
            {"execute": "query-version", "id": mark}).encode() + b"\n")
        out = []
        while True:
            reply = json.loads(self.reader.readline())
            if reply.get("id") == mark:
                return out
            if "event" not in reply:
                out.append(reply)

    def close(self) -> None:
        self.sock.close()
        self.process.kill()
        self.process.wait()


@pytest.fixture(scope="module")
def qsd(tmp_path_factory):
    monitor = QsdMonitor(tmp_path_factory.mktemp("qsd-stream"))
    yield monitor
    monitor.close()


def expected_replies(payload: bytes) -> list:
    parser = JSONStreamParser()
    return parser.feed(payload) + parser.feed(RESYNC)


def assert_same(payload: bytes, replies: list[dict]) -> None:
    items = expected_replies(payload)
    got = [r.get("error", {}).get("desc", r) for r in replies]
    assert len(items) == len(replies), (payload, items, got)
    for item, desc in zip(items, got):
        if isinstance(item, StreamError):
            assert desc == item.desc, (payload, items, got)
        elif not isinstance(item.value, dict):
            assert desc == "QMP input must be a JSON object", (payload, items, got)
        else:
            assert not (isinstance(desc, str) and desc.startswith("JSON ")), (payload, items, got)


CASES = [
    b'{"execute": 01}',
    b"1\xff",
    b'"abc\x01def" {}',
    b'{"a":0e5}',
    b"[}]",
    b'{"a":1]',
    b'"\\u12" "\\uD83D\\u0041" "\\uFFFF" "\\uD83D\\uDE00" "\\ufdd0"',
    b'"\xef\xbf\xbf" "\xc0\x80" "\xed\xa0\x80" "\xf4\x90\x80\x80" "\xe0\x80\xaf"',
    b'{"a":1,"a":2} %d trueA',
    b"'single \\' \"quoted\"' ['a', \"b\"]",
    b"[1-2] [1true] [\"a\"\"b\"] 1.5.3 -a 1.} 1e+x",
    b"[NaN] [-Infinity] [nul] [" + b"x" * 1500 + b"]",
    b'{1:2} {"a" 1} {"a":1 "b":2} [1 2] [1,] {"a":}',
    b'["\\x"] ["\\u"] ["\\u12', 
    b"[9223372036854775807, 18446744073709551616, -9223372036854775809, 1e400]",
    b"@ \t 7 \r 8 @ 7 \x01 9 ",
    b"[" * 1024 + b"]" * 1024,
    b"[" * 1025 + b"]" * 1025,
    b'{"a":' * 600 + b"[" * 425 + b"]" * 425 + b"}" * 600,
    b"[" + b"}" * 3 + b"[" * 1030 + b"]" * 1031,
]


@pytest.mark.parametrize("payload", CASES, ids=range(len(CASES)))
def test_hand_picked_streams(qsd, payload):
    assert_same(payload, qsd.replies(payload))


_PIECES = [b"{", b"}", b"[", b"]", b":", b",", b'"', b"'", b"\\", b"u", b"0", b"1", b"9", b"-",
           b"+", b".", b"e", b"E", b"a", b"true", b"null", b"x", b" ", b"\n", b"\t", b"\r",
           b"\x00", b"\x01", b"\x7f", b"\x80", b"\xc0", b"\xc3\xa9", b"\xef\xbf\xbf",
           b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xfe", b"\xff", b"%", b'"execute"', b"D83D",
           b"\\uDC00", b"A", b"/", b"\\u0000"]


def test_random_streams(qsd):
    rnd = random.Random(20240607)
    for _ in range(300):
        payload = b"".join(rnd.choice(_PIECES) for _ in range(rnd.randint(1, 30)))
        assert_same(payload, qsd.replies(payload))
