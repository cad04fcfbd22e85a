"""Load: 256 concurrent sessions issue commands while jobs run.

Every command is answered (matched by id), every session sees exactly the
job events the job-driving session sees (none lost, none duplicated, same
order), and the daemon's RSS stays flat between the warm-up and the end.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import trio

from tests.reliability.launch import start_qmpd, stop
from tests.qmp_client import decode_message
from tests.reliability.qmp_wire import rss_kib

SESSIONS = 256

COMMANDS = [
    {"execute": "query-version"},
    {"execute": "query-jobs"},
    {"execute": "query-named-block-nodes"},
    {"execute": "query-commands"},
    {"execute": "no-such-command"},
    {"execute": "query-version", "arguments": {"bogus": 1}},
]


class AsyncQMP:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""
        self.events: list[dict] = []

    @classmethod
    async def connect(cls, path: str) -> "AsyncQMP":
        q = cls(await trio.open_unix_socket(path))
        greeting = await q.recv()
        assert "QMP" in greeting
        await q.send({"execute": "qmp_capabilities", "id": "neg"})
        assert (await q.reply())["id"] == "neg"
        return q

    async def send(self, message: dict) -> None:
        await self.stream.send_all(json.dumps(message).encode())

    async def recv(self) -> dict:
        while b"\n" not in self.buf:
            chunk = await self.stream.receive_some(65536)
            assert chunk, "daemon closed a session under load"
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return decode_message(line)

    async def reply(self) -> dict:
        while True:
            msg = await self.recv()
            if "event" in msg:
                self.events.append(msg)
            else:
                return msg


async def test_256_sessions_with_jobs(scale, figures):
    work = tempfile.mkdtemp(prefix="qmpd-load-")
    sock = os.path.join(work, "q.sock")
    proc = start_qmpd(sock, os.path.join(work, "q.log"))
    per_session = scale(30, 400)
    jobs = scale(20, 200)
    answered = 0
    rss: dict[str, int] = {}
    try:
        sessions = [await AsyncQMP.connect(sock) for _ in range(SESSIONS)]
        driver = await AsyncQMP.connect(sock)
        all_negotiated = trio.Event()
        rss["start"] = rss_kib(proc.pid)

        async def client(index: int, q: AsyncQMP) -> None:
            nonlocal answered
            await all_negotiated.wait()
            window = 4  # requests in flight per session
            sent = received = 0
            while received < per_session:
                while sent < per_session and sent - received < window:
                    message = dict(COMMANDS[(index + sent) % len(COMMANDS)])
                    message["id"] = [index, sent]
                    await q.send(message)
                    sent += 1
                reply = await q.reply()
                assert reply["id"] == [index, received], reply
                assert ("return" in reply) != ("error" in reply)
                received += 1
                answered += 1
                if index == 0 and received == per_session // 10:
                    rss["warm"] = rss_kib(proc.pid)
            # Keep reading events while jobs run: a session that stops reading
            # is the slow-reader case (test_limits), not this one.
            with trio.CancelScope() as scope:
                draining.append(scope)
                while True:
                    q.events.append(await q.recv())

        async def job_driver() -> None:
            await all_negotiated.wait()
            for i in range(jobs):
                await driver.send({"execute": "blockdev-create", "id": i, "arguments": {
                    "job-id": f"j{i}", "options": {"driver": "file", "size": 0,
                                                   "filename": os.path.join(work, f"f{i}")}}})
                assert (await driver.reply())["id"] == i
                while not any(e["event"] == "JOB_STATUS_CHANGE" and e["data"] == {
                        "id": f"j{i}", "status": "concluded"} for e in driver.events[-6:]):
                    driver.events.append(await driver.recv())
                await driver.send({"execute": "job-dismiss", "id": f"d{i}",
                                   "arguments": {"id": f"j{i}"}})
                assert "return" in await driver.reply()

        draining: list[trio.CancelScope] = []
        async with trio.open_nursery() as nursery:
            for index, q in enumerate(sessions):
                nursery.start_soon(client, index, q)
            all_negotiated.set()
            await job_driver()
            while len(draining) < SESSIONS:
                await trio.sleep(0.01)
            for scope in draining:
                scope.cancel()
        # Drain: a sentinel reply proves every earlier event reached each session.
        expected = [e for e in driver.events if e["event"] == "JOB_STATUS_CHANGE"]
        assert len(expected) == jobs * 6  # created running waiting pending concluded null
        for q in sessions:
            await q.send({"execute": "query-version", "id": "end"})
            assert (await q.reply())["id"] == "end"
            got = [e for e in q.events if e["event"] == "JOB_STATUS_CHANGE"]
            assert [e["data"] for e in got] == [e["data"] for e in expected]
        rss["end"] = rss_kib(proc.pid)
        for q in sessions + [driver]:
            await q.stream.aclose()
    finally:
        stop(proc)
        shutil.rmtree(work, ignore_errors=True)
    figures("load: sessions held concurrently", SESSIONS + 1)
    figures("load: commands answered (+ jobs run)", f"{answered} (+{jobs})")
    figures("load: daemon RSS start/warm/end (KiB)",
            f"{rss['start']}/{rss.get('warm')}/{rss['end']}")
    assert answered == SESSIONS * per_session
    assert rss["end"] < rss["warm"] + 8 * 1024, rss
