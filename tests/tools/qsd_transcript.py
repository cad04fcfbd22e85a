"""The transcript engine of the recorded qsd cases: cases, playing, comparing.

Theory of operation
-------------------
A *case* is a short, self-contained conversation: images and files to make
first (with qemu-img, so the replay can make the same ones), extra daemon
arguments, whether to negotiate, and a list of *steps*. A step sends one raw
chunk of bytes and reads what comes back: at least ``responses`` replies
(returns and errors), until every ``until`` event matcher has been seen (or an
error reply says the awaited job never started), and then until the socket has
been quiet for a short while, so that unexpected extra messages are caught too.

The recorder plays each case against a fresh qemu-storage-daemon and writes
``tests/data/qsd/<group>.json``. ``tests/integration/test_qsd_reference.py``
plays the very same cases against a fresh qmpd and compares the normalised
transcripts. Both sides use :func:`prepare`, :func:`play` and
:class:`Normaliser` from this module, so recording and replay cannot drift.

Paths in sends and daemon arguments are written ``{tmp}/name`` and expanded to
the case's scratch directory; in replies the directory is folded back to
``{tmp}``. Chunks that are not valid UTF-8 are stored as ``send_b64``.

The cases live in tests/tools/qsd_cases_*.py; tests/tools/record_qsd.py
records them: ``.venv/bin/python -m tests.tools.record_qsd [--group NAME ...]``.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from tests import qsd
from tests.processes import stop
from tests.qmp_client import connect_unix

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "qsd"

#: How long the socket must stay silent before a step is over.
SETTLE_SECONDS = 0.15
#: How long a step may wait for its expected replies and events.
STEP_DEADLINE_SECONDS = 20.0


# --------------------------------------------------------------------------
# Case description


@dataclass
class Step:
    send: bytes
    responses: int = 1
    until: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        out: dict[str, Any] = {}
        try:
            out["send"] = self.send.decode("utf-8")
        except UnicodeDecodeError:
            out["send_b64"] = base64.b64encode(self.send).decode("ascii")
        out["responses"] = self.responses
        if self.until:
            out["until"] = self.until
        return out


@dataclass
class Case:
    name: str
    steps: list[Step]
    negotiate: str | None = "plain"   # None, "plain" or "oob"
    daemon_args: list[str] = field(default_factory=list)
    images: list[dict] = field(default_factory=list)
    files: list[dict] = field(default_factory=list)
    #: {"note": why qmpd deliberately differs, "skip": [parts]}; see the replay.
    difference: dict | None = None

    def to_json(self) -> dict:
        out: dict[str, Any] = {"name": self.name}
        if self.images:
            out["images"] = self.images
        if self.files:
            out["files"] = self.files
        if self.daemon_args:
            out["daemon_args"] = self.daemon_args
        out["negotiate"] = self.negotiate
        out["steps"] = [s.to_json() for s in self.steps]
        if self.difference:
            out["difference"] = self.difference
        return out


def step_send_bytes(step: dict) -> bytes:
    if "send_b64" in step:
        return base64.b64decode(step["send_b64"])
    return step["send"].encode("utf-8")


def expand(text: str, tmp: str) -> str:
    return text.replace("{tmp}", tmp)


# --------------------------------------------------------------------------
# Preparing images and files (shared with the replay)


def prepare(case: dict, tmp: str, cache: str | None = None) -> None:
    """Make the images and files a case needs inside ``tmp``.

    With ``cache`` (a directory), each distinct image is made once with
    qemu-img and copied afterwards: the copies differ from fresh images only
    in values the normaliser folds (UUID, salts).
    """
    for f in case.get("files", []):
        Path(expand(f["path"], tmp)).write_text(f["text"])
    for img in case.get("images", []):
        path = expand(img["path"], tmp)
        if cache is None:
            make_image(img, path)
            continue
        key = json.dumps({k: v for k, v in sorted(img.items()) if k != "path"}, sort_keys=True)
        cached = os.path.join(cache, f"img-{abs(hash(key)):x}")
        if not os.path.exists(cached):
            make_image(img, cached + ".part")
            os.replace(cached + ".part", cached)
        shutil.copyfile(cached, path)


def make_image(img: dict, path: str) -> None:
    from tests.oracles import qemu_img_create_luks, run_qemu_img

    fmt = img["format"]
    if fmt in ("luks", "qcow2-luks"):
        qemu_img_create_luks(path, img["passphrase"], size=img.get("size", "16M"),
                             iter_time=img.get("iter_time", 10),
                             fmt="luks" if fmt == "luks" else "qcow2")
    else:
        run_qemu_img(["create", "-q", "-f", fmt, path, img.get("size", "16M")])


MUTATING_COMMANDS = ("object-add", "object-del", "blockdev-add", "blockdev-del",
                     "blockdev-create", "blockdev-amend", "blockdev-reopen", "job-", "quit")


def needs_fresh_daemon(case: dict) -> bool:
    """Whether a case may change daemon state, so it cannot share a daemon.

    Cases with images, files or daemon arguments always get their own
    daemon; so does any case that sends a state-changing command and got
    anything but errors back.
    """
    if case.get("images") or case.get("files") or case.get("daemon_args"):
        return True
    for step in case["steps"]:
        text = step_send_bytes(step).decode("utf-8", "replace")
        if any(c in text for c in MUTATING_COMMANDS):
            if any(not (isinstance(r, dict) and "error" in r) for r in step["replies"]):
                return True
    return False


# --------------------------------------------------------------------------
# Talking to a daemon


class Wire:
    """A raw QMP connection: send bytes, collect newline-framed JSON messages."""

    def __init__(self, path: str, connect_timeout: float = 10.0):
        self.sock = connect_unix(path, connect_timeout)
        self.buf = b""
        self.eof = False

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        if data and not self.eof:
            try:
                self.sock.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                self.eof = True     # what was said before the close is still read

    def _recv(self, timeout: float) -> bool:
        """Receive once; False on timeout or EOF."""
        if self.eof:
            return False
        self.sock.settimeout(max(timeout, 0.001))
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            return False
        except OSError:
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def _pop_messages(self) -> list[Any]:
        out = []
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            line = line.rstrip(b"\r")
            if not line.strip():
                continue
            out.append(parse_message(line))
        return out

    def read(self, responses: int, until: list[dict],
             settle: float = SETTLE_SECONDS,
             deadline: float = STEP_DEADLINE_SECONDS) -> list[Any]:
        """Messages until the expectations are met and the line goes quiet."""
        got: list[Any] = []
        end = time.monotonic() + deadline
        pending = list(until)

        def satisfied() -> bool:
            replies = [m for m in got if not is_event(m)]
            if len(replies) < responses:
                return False
            if pending and any(isinstance(m, dict) and "error" in m for m in replies):
                return True     # the awaited job never started
            return not pending

        while True:
            for msg in self._pop_messages():
                got.append(msg)
                pending[:] = [p for p in pending if not event_matches(p, msg)]
            if self.eof:
                return got
            if satisfied():
                if not self._recv(settle):
                    got.extend(self._pop_messages())
                    return got
                continue
            remaining = end - time.monotonic()
            if remaining <= 0:
                return got
            self._recv(min(remaining, 0.5))


NON_FINITE_RE = re.compile(rb"([:\[,]\s*)(-?)(inf|nan)\b")


def parse_message(line: bytes) -> Any:
    """One JSON message; QEMU's non-JSON output is kept recognisable.

    QEMU 7.2 prints a number too large for a double as ``inf`` (not JSON);
    such a message is recorded as ``{"invalid_json": <value, inf as float>}``.
    Anything else unparsable is kept as text.
    """
    try:
        return json.loads(line)
    except ValueError:
        pass
    fixed = NON_FINITE_RE.sub(lambda m: m.group(1) + m.group(2)
                              + (b"Infinity" if m.group(3) == b"inf" else b"NaN"), line)
    try:
        return {"invalid_json": json.loads(fixed)}
    except ValueError:
        return {"unparsable": line.decode("utf-8", "backslashreplace")}


def is_event(msg: Any) -> bool:
    return isinstance(msg, dict) and "event" in msg


def event_matches(pattern: dict, msg: Any) -> bool:
    if not is_event(msg) or msg.get("event") != pattern.get("event"):
        return False
    data = msg.get("data", {})
    return all(data.get(k) == v for k, v in pattern.get("data", {}).items())


def play(case: dict, sock_path: str, tmp: str, settle: float = SETTLE_SECONDS,
         step_settle: float | None = None) -> dict:
    """Play one case over a fresh connection; the raw transcript.

    ``settle`` is the quiet time that ends the last step (and so catches
    anything unexpected after it); ``step_settle`` (default: the same) ends
    the others -- a message that comes later still shows, in the next
    step's messages, where the comparison finds it.
    """
    quick = settle if step_settle is None else step_settle
    wire = Wire(sock_path)
    try:
        greeting = wire.read(0, [], settle=quick, deadline=5)
        if not greeting:    # a slow start: wait for the greeting explicitly
            greeting = wire.read(1, [], settle=quick, deadline=5)
        transcript: dict[str, Any] = {"greeting": greeting[0] if greeting else None}
        if len(greeting) > 1:
            transcript["after_greeting"] = greeting[1:]
        if case.get("negotiate"):
            args = {"enable": ["oob"]} if case["negotiate"] == "oob" else {}
            wire.send(json.dumps({"execute": "qmp_capabilities",
                                  "arguments": args}).encode())
            last = not case["steps"]
            transcript["negotiation"] = wire.read(1, [], settle=settle if last else quick)
        steps = []
        for index, step in enumerate(case["steps"]):
            if wire.eof:
                steps.append({"replies": [], "eof": True})
                continue
            data = expand(step_send_bytes(step).decode("utf-8", "surrogateescape"), tmp)
            wire.send(data.encode("utf-8", "surrogateescape"))
            wait = settle if index == len(case["steps"]) - 1 else quick
            msgs = wire.read(step.get("responses", 1), step.get("until", []), settle=wait)
            entry: dict[str, Any] = {"replies": msgs}
            if wire.eof:
                entry["eof"] = True
            steps.append(entry)
        transcript["steps"] = steps
        return transcript
    finally:
        wire.close()


# --------------------------------------------------------------------------
# Normalisation


UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
GENERATED_NODE_RE = re.compile(r"#block\d+")

#: Keys whose values depend on timing (PBKDF2 calibration) or on the file
#: system, not on the daemon's behaviour.
VOLATILE_KEYS = {"actual-size": 0, "iters": 0, "master-key-iters": 0,
                 "timestamp": {"seconds": 0, "microseconds": 0}}


class Normaliser:
    """Fold what legitimately differs between runs and daemons.

    - timestamps, ``package`` strings, the QEMU micro version (a distribution's
      patch level: 7.2.22 on Debian 12) are blanked;
    - the scratch directory becomes ``{tmp}``, UUIDs become ``{uuid}``;
    - generated node names (``#blockNNN``) are renumbered by order of first
      appearance, so only their identity pattern is compared;
    - key slot iteration counts and ``actual-size`` are zeroed.
    """

    def __init__(self, tmp: str):
        self.tmp = tmp
        self.real_tmp = os.path.realpath(tmp)
        self.nodes: dict[str, str] = {}

    def text(self, s: str) -> str:
        s = s.replace(self.real_tmp, "{tmp}").replace(self.tmp, "{tmp}")
        s = UUID_RE.sub("{uuid}", s)
        return GENERATED_NODE_RE.sub(self._node, s)

    def _node(self, m: re.Match) -> str:
        return self.nodes.setdefault(m.group(0), f"#block{len(self.nodes)}")

    def value(self, v: Any) -> Any:
        if isinstance(v, str):
            return self.text(v)
        if isinstance(v, list):
            return [self.value(x) for x in v]
        if isinstance(v, dict):
            out = {}
            for k, x in v.items():
                if k in VOLATILE_KEYS:
                    out[k] = VOLATILE_KEYS[k]
                elif k == "package" and isinstance(x, str):
                    out[k] = ""
                elif k == "qemu" and isinstance(x, dict) and "micro" in x:
                    out[k] = {**x, "micro": 0}
                else:
                    out[k] = self.value(x)
            return out
        return v

    def transcript(self, t: dict) -> dict:
        return self.value(t)


def split_replies(replies: list[Any]) -> tuple[list[Any], list[Any]]:
    """(returns and errors in order, events in order)."""
    return ([m for m in replies if not is_event(m)], [m for m in replies if is_event(m)])


def interleaving(replies: list[Any]) -> list[str]:
    """Where the replies fall among the events: qsd runs a job until its
    first yield before it answers, so that order is deterministic there and
    compared too (events by name, replies as "reply")."""
    return [m["event"] if is_event(m) else "reply" for m in replies]


def skipped_parts(case: dict) -> set[str]:
    diff = case.get("difference")
    return set(diff.get("skip", [])) if isinstance(diff, dict) else set()


def compare(case: dict, got: dict) -> list[str]:
    """Where a normalised transcript differs from the recorded case.

    Each entry names the part (``greeting``, ``negotiation``,
    ``steps[N].replies``, ``steps[N].events``, ``steps[N].eof``) and shows both
    sides. Parts listed in the case's ``difference.skip`` are left out.
    """
    skip = skipped_parts(case)
    out = []

    def check(part: str, want: Any, have: Any) -> None:
        if part in skip or part.split(".")[0] in skip:
            return
        if want != have:
            out.append(f"{part}:\n  qsd:  {json.dumps(want)[:2000]}\n  got:  "
                       f"{json.dumps(have)[:2000]}")

    check("greeting", case.get("greeting"), got.get("greeting"))
    check("greeting", case.get("after_greeting", []), got.get("after_greeting", []))
    if case.get("negotiate"):
        check("negotiation", case.get("negotiation"), got.get("negotiation"))
    for i, want in enumerate(case["steps"]):
        have = got["steps"][i] if i < len(got.get("steps", [])) else {"replies": []}
        want_replies, want_events = split_replies(want["replies"])
        have_replies, have_events = split_replies(have["replies"])
        check(f"steps[{i}].replies", want_replies, have_replies)
        check(f"steps[{i}].events", want_events, have_events)
        if not {f"steps[{i}].events", f"steps[{i}].replies"} & skip:
            check(f"steps[{i}].order", interleaving(want["replies"]),
                  interleaving(have["replies"]))
        check(f"steps[{i}].eof", bool(want.get("eof")), bool(have.get("eof")))
    return out


# --------------------------------------------------------------------------
# Running qemu-storage-daemon


def start_qsd(sock_path: str, daemon_args: list[str], tmp: str) -> subprocess.Popen:
    """tests/qsd.py's launcher with a case's arguments, its output in tmp/qsd.log."""
    return qsd.start_qsd(sock_path, [expand(a, tmp) for a in daemon_args],
                         log_path=os.path.join(tmp, "qsd.log"))


def play_qsd(spec: dict) -> dict:
    """Play a case against a fresh qsd; the normalised transcript."""
    tmp = tempfile.mkdtemp(prefix="qsd-")
    try:
        prepare(spec, tmp)
        sock = os.path.join(tmp, "qmp.sock")
        proc = start_qsd(sock, spec.get("daemon_args", []), tmp)
        try:
            raw = play(spec, sock, tmp)
        finally:
            stop(proc)
        return Normaliser(tmp).transcript(raw)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def record_case(case: Case) -> dict:
    spec = case.to_json()
    norm = play_qsd(spec)
    spec["greeting"] = norm["greeting"]
    if "after_greeting" in norm:
        spec["after_greeting"] = norm["after_greeting"]
    if "negotiation" in norm:
        spec["negotiation"] = norm["negotiation"]
    for s, got in zip(spec["steps"], norm["steps"]):
        s["replies"] = got["replies"]
        # replay waits for as many replies as qsd actually gave
        s["responses"] = len(split_replies(got["replies"])[0])
        if got.get("eof"):
            s["eof"] = True
    return spec


# --------------------------------------------------------------------------
# The cases


def cmd(name: str | None = None, args: Any = None, *, id: Any = ...,
        key: str = "execute", **extra: Any) -> str:
    msg: dict[str, Any] = {}
    if name is not None:
        msg[key] = name
    if args is not None:
        msg["arguments"] = args
    if id is not ...:
        msg["id"] = id
    msg.update(extra)
    return json.dumps(msg)


def S(send: str | bytes, responses: int = 1, until: Iterable[dict] = ()) -> Step:
    if isinstance(send, str):
        send = send.encode("utf-8")
    return Step(send, responses, list(until))


def C(name: str, *steps: Step | str, **kw: Any) -> Case:
    return Case(name, [s if isinstance(s, Step) else S(s) for s in steps], **kw)


def job_event(job: str, status: str) -> dict:
    return {"event": "JOB_STATUS_CHANGE", "data": {"id": job, "status": status}}


# Fixed material for an AES-256-CBC encrypted secret (crypto/secret_common.c:
# the key secret must decode to 32 bytes, the IV to 16; the ciphertext is
# base64 in 'data' when format=base64, the plaintext is PKCS#7 padded).
SECRET_KEY = bytes(range(32))
SECRET_IV = bytes(range(100, 116))


def encrypt_secret(plaintext: bytes, pad_value: int | None = None) -> str:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    n = 16 - len(plaintext) % 16
    padded = plaintext + bytes([n if pad_value is None else pad_value]) * n
    enc = Cipher(algorithms.AES(SECRET_KEY), modes.CBC(SECRET_IV)).encryptor()
    return base64.b64encode(enc.update(padded) + enc.finalize()).decode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


LUKS_IMG = {"path": "{tmp}/a.img", "format": "luks", "passphrase": "pass0"}
QCOW_IMG = {"path": "{tmp}/q.qcow2", "format": "qcow2-luks", "passphrase": "pass0"}
SECRETS = ["--object", "secret,id=s0,data=pass0", "--object", "secret,id=s1,data=pass1",
           "--object", "secret,id=s2,data=pass2", "--object", "secret,id=bad,data=wrong"]


def secret_add(id: str, **props: Any) -> str:
    return cmd("object-add", {"qom-type": "secret", "id": id, **props})


def luks_node(name: str = "l0", key: str = "s0", path: str = "{tmp}/a.img", **extra: Any) -> str:
    return cmd("blockdev-add", {"driver": "luks", "node-name": name, "key-secret": key,
                                "file": {"driver": "file", "filename": path}, **extra})
