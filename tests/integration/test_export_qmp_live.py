"""Export commands whose answers depend on a connected NBD client, against qsd and qmpd.

The recorded conversations (tests/data/qsd/exports.json) cannot hold an
NBD client open or a TCP port taken by someone else. Here each scenario is
played against a fresh qemu-storage-daemon and a fresh qmpd with the same
images and arguments, real NBD clients held open by the test, and the
transcripts (replies, events, and where the replies fall among the events)
must be equal.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Callable

import pytest

from tests.integration.exports_helpers import (Qmp, hold_nbd_client, plain_image, rmtree,
                                               short_tmp, wait_for_socket)
from tests.oracles import require
from tests.processes import stop
from tests.tools.qsd_transcript import start_qsd

pytestmark = pytest.mark.interop

Scenario = Callable[["Player"], None]


class Player:
    """One daemon under test: its QMP connection, NBD socket and transcript."""

    def __init__(self, qmp: Qmp, nbd_sock: str, tmp: str) -> None:
        self.qmp = qmp
        self.nbd_sock = nbd_sock
        self.tmp = tmp
        self.transcript: list = []
        self.clients: list[socket.socket] = []

    def say(self, name: str, args: dict | None = None, settle: float = 0.2) -> list:
        """Send a command; every message until the line is quiet, in order."""
        self.qmp.send_command(name, args)
        got: list = []
        replied = False
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                msg = self.qmp.recv(settle if replied else 20)
            except TimeoutError:
                break
            msg.pop("timestamp", None)
            got.append(msg)
            replied = replied or "event" not in msg
        shown = json.loads(json.dumps(args).replace(self.tmp, "{tmp}")) if args else args
        self.transcript.append({"send": name, "args": shown, "got": got})
        return got

    def note(self, what: str, value) -> None:
        self.transcript.append({what: value})

    def client(self, name: str = "disk") -> socket.socket:
        s = hold_nbd_client(self.nbd_sock, name)
        self.clients.append(s)
        return s

    def close(self) -> None:
        for s in self.clients:
            s.close()
        self.qmp.close()


def client_hung_up(s: socket.socket, timeout: float = 5.0) -> bool:
    s.settimeout(timeout)
    try:
        return s.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def greeted(s: socket.socket, timeout: float) -> bool:
    s.settimeout(timeout)
    try:
        return s.recv(8) == b"NBDMAGIC"
    except socket.timeout:
        return False


def play_both(qmpd_daemon, scenario: Scenario, extra_args: list[str] = ()) -> None:
    require("qemu-storage-daemon")
    transcripts = []
    for daemon in ("qsd", "qmpd"):
        tmp = short_tmp("qxl-")
        try:
            img = plain_image(os.path.join(tmp, "a.img"), "raw", "16M")
            nbd_sock = os.path.join(tmp, "nbd.sock")
            args = ["--blockdev", f"driver=file,node-name=f0,filename={img}",
                    "--nbd-server", f"addr.type=unix,addr.path={nbd_sock}", *extra_args]
            if daemon == "qsd":
                sock = os.path.join(tmp, "qsd.sock")
                proc = start_qsd(sock, args, tmp)
            else:
                sock, proc = qmpd_daemon(*args, workdir=tmp)
            try:
                wait_for_socket(nbd_sock)
                player = Player(Qmp(sock), nbd_sock, tmp)
                try:
                    scenario(player)
                finally:
                    player.close()
                transcripts.append(player.transcript)
            finally:
                stop(proc)
        finally:
            rmtree(tmp)
    assert transcripts[1] == transcripts[0], (
        "qmpd differs from qsd:\n" + "\n".join(
            f"  qsd:  {a}\n  qmpd: {b}" for a, b in zip(*transcripts) if a != b))


def add(p: Player, export_id: str = "e0", name: str = "disk", **extra) -> None:
    p.say("block-export-add", {"type": "nbd", "id": export_id, "node-name": "f0",
                               "name": name, "writable": True, **extra})


def test_safe_delete_refused_while_a_client_is_connected(qmpd_daemon) -> None:
    def scenario(p: Player) -> None:
        add(p)
        c = p.client()
        p.say("block-export-del", {"id": "e0"})
        p.say("nbd-server-remove", {"name": "e0"})
        p.say("block-export-del", {"id": "e0", "mode": "safe"})
        p.say("query-block-exports")
        p.say("blockdev-del", {"node-name": "f0"})
        p.note("client still connected", not client_hung_up(c, 0.3))
        c.close()
        time.sleep(0.3)
        p.say("block-export-del", {"id": "e0"})
    play_both(qmpd_daemon, scenario)


def test_hard_delete_hangs_up_and_the_event_follows_the_reply(qmpd_daemon) -> None:
    def scenario(p: Player) -> None:
        add(p)
        c1, c2 = p.client(), p.client()
        p.say("block-export-del", {"id": "e0", "mode": "hard"})
        p.note("clients hung up", [client_hung_up(c1), client_hung_up(c2)])
        p.say("query-block-exports")
        p.say("block-export-del", {"id": "e0"})
        add(p)
        p.say("query-block-exports")
    play_both(qmpd_daemon, scenario)


def test_legacy_remove_hard_with_a_client(qmpd_daemon) -> None:
    def scenario(p: Player) -> None:
        p.say("nbd-server-add", {"device": "f0", "name": "disk", "writable": True})
        c = p.client()
        p.say("nbd-server-remove", {"name": "disk"})
        p.say("nbd-server-remove", {"name": "disk", "mode": "hard"})
        p.note("client hung up", client_hung_up(c))
        p.say("query-block-exports")
    play_both(qmpd_daemon, scenario)


def test_server_stop_with_clients(qmpd_daemon) -> None:
    def scenario(p: Player) -> None:
        add(p)
        add(p, "e1", "other")
        c0, c1 = p.client(), p.client("other")
        p.say("nbd-server-stop")
        p.note("clients hung up", [client_hung_up(c0), client_hung_up(c1)])
        p.say("query-block-exports")
        p.say("blockdev-del", {"node-name": "f0"})
    play_both(qmpd_daemon, scenario)


def test_unknown_export_name_keeps_the_client(qmpd_daemon) -> None:
    def scenario(p: Player) -> None:
        add(p)
        try:
            p.client("nope")
            p.note("refused", False)
        except AssertionError as exc:
            p.note("refused", str(exc))
        p.say("block-export-del", {"id": "e0"})
    play_both(qmpd_daemon, scenario)


def test_max_connections_makes_clients_wait(qmpd_daemon) -> None:
    def scenario(p: Player) -> None:
        add(p)
        first = p.client()
        waiting = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        p.clients.append(waiting)
        waiting.connect(p.nbd_sock)
        p.note("second greeted while the first is connected", greeted(waiting, 0.5))
        first.close()
        p.note("second greeted once the first left", greeted(waiting, 5))
    # max-connections is nbd-server-start's: restart the server with it.
    def restarted(p: Player) -> None:
        p.say("nbd-server-stop")
        p.say("nbd-server-start", {"addr": {"type": "unix", "data": {"path": p.nbd_sock}},
                                   "max-connections": 1})
        scenario(p)
    play_both(qmpd_daemon, restarted)


def _taken_port() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s


def test_port_in_use(qmpd_daemon) -> None:
    taken = _taken_port()
    port = taken.getsockname()[1]
    try:
        def scenario(p: Player) -> None:
            p.say("nbd-server-stop")
            p.say("nbd-server-start", {"addr": {"type": "inet", "data": {
                "host": "127.0.0.1", "port": str(port)}}})
            p.say("nbd-server-start", {"addr": {"type": "inet", "data": {
                "host": "127.0.0.1", "port": str(port), "to": port}}})
            p.say("query-block-exports")
        play_both(qmpd_daemon, scenario)
    finally:
        taken.close()


def test_port_range_skips_a_taken_port(qmpd_daemon) -> None:
    taken = _taken_port()
    port = taken.getsockname()[1]
    try:
        def scenario(p: Player) -> None:
            p.say("nbd-server-stop")
            got = p.say("nbd-server-start", {"addr": {"type": "inet", "data": {
                "host": "127.0.0.1", "port": str(port), "to": port + 20}}})
            p.note("started", got)
            add(p)
            served = False
            for candidate in range(port + 1, port + 21):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                try:
                    s.settimeout(2)
                    s.connect(("127.0.0.1", candidate))
                    served = s.recv(8) == b"NBDMAGIC"
                    break
                except OSError:
                    continue
                finally:
                    s.close()
            p.note("served on a later port of the range", served)
        play_both(qmpd_daemon, scenario)
    finally:
        taken.close()
