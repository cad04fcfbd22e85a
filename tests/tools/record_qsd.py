"""Record qemu-storage-daemon 7.2's answers to QMP conversations.

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

Run: ``.venv/bin/python -m tests.tools.record_qsd [--group NAME ...]``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from tests.processes import stop

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
        deadline = time.monotonic() + connect_timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(path)
                break
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.sock = sock
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


def play(case: dict, sock_path: str, tmp: str, settle: float = SETTLE_SECONDS) -> dict:
    """Play one case over a fresh connection; the raw transcript."""
    wire = Wire(sock_path)
    try:
        greeting = wire.read(0, [], settle=settle, deadline=5)
        if not greeting:    # a slow start: wait for the greeting explicitly
            greeting = wire.read(1, [], settle=settle, deadline=5)
        transcript: dict[str, Any] = {"greeting": greeting[0] if greeting else None}
        if len(greeting) > 1:
            transcript["after_greeting"] = greeting[1:]
        if case.get("negotiate"):
            args = {"enable": ["oob"]} if case["negotiate"] == "oob" else {}
            wire.send(json.dumps({"execute": "qmp_capabilities",
                                  "arguments": args}).encode())
            transcript["negotiation"] = wire.read(1, [], settle=settle)
        steps = []
        for step in case["steps"]:
            if wire.eof:
                steps.append({"replies": [], "eof": True})
                continue
            data = expand(step_send_bytes(step).decode("utf-8", "surrogateescape"), tmp)
            wire.send(data.encode("utf-8", "surrogateescape"))
            msgs = wire.read(step.get("responses", 1), step.get("until", []), settle=settle)
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
    args = ["qemu-storage-daemon",
            "--chardev", f"socket,id=c0,path={sock_path},server=on,wait=off",
            "--monitor", "chardev=c0"]
    args += [expand(a, tmp) for a in daemon_args]
    log_path = os.path.join(tmp, "qsd.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while not os.path.exists(sock_path):
        if proc.poll() is not None:
            raise RuntimeError(f"qsd exited: {Path(log_path).read_text(errors='replace')}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("qsd did not create its socket")
        time.sleep(0.01)
    return proc


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


def greeting_cases() -> list[Case]:
    pre = {"negotiate": None}
    return [
        C("greeting-only", **pre),
        C("pre-query-version", cmd("query-version"), **pre),
        C("pre-query-version-with-id", cmd("query-version", id="x1"), **pre),
        C("pre-unknown-command", cmd("no-such-command"), **pre),
        C("pre-query-commands", cmd("query-commands"), **pre),
        C("pre-exec-oob", cmd("query-version", key="exec-oob", id=1), **pre),
        C("pre-caps-bad-member", cmd("qmp_capabilities", {"bogus": 1}), **pre),
        C("pre-caps-enable-oob", cmd("qmp_capabilities", {"enable": ["oob"]}),
          cmd("query-version"), **pre),
        C("pre-caps-enable-bogus", cmd("qmp_capabilities", {"enable": ["bogus"]}),
          cmd("query-version"), **pre),
        C("pre-caps-enable-string", cmd("qmp_capabilities", {"enable": "oob"}), **pre),
        C("pre-caps-enable-int-item", cmd("qmp_capabilities", {"enable": [1]}), **pre),
        C("pre-caps-enable-empty", cmd("qmp_capabilities", {"enable": []}),
          cmd("query-version"), **pre),
        C("pre-caps-enable-oob-twice", cmd("qmp_capabilities", {"enable": ["oob", "oob"]}),
          **pre),
        C("pre-caps-enable-null", cmd("qmp_capabilities", {"enable": None}), **pre),
        C("pre-caps-empty-arguments", cmd("qmp_capabilities", {}), cmd("query-version"), **pre),
        C("pre-caps-no-arguments", cmd("qmp_capabilities"), **pre),
        C("pre-caps-arguments-list", cmd("qmp_capabilities", []), **pre),
        C("pre-caps-with-id", cmd("qmp_capabilities", id={"n": [1, 2]}), **pre),
        C("pre-caps-exec-oob", cmd("qmp_capabilities", key="exec-oob"), **pre),
        C("pre-parse-error", S("{\"execute\": }"), cmd("qmp_capabilities"), **pre),
        C("pre-non-object", "42\n", **pre),
        C("pre-missing-execute", cmd(None, {}), **pre),
        C("second-negotiation", cmd("qmp_capabilities")),
        C("second-negotiation-oob", cmd("qmp_capabilities", {"enable": ["oob"]})),
        C("negotiated-query-version", cmd("query-version", id=7)),
        C("negotiated-oob-query-version", cmd("query-version"), negotiate="oob"),
    ]


def envelope_cases() -> list[Case]:
    cases = [
        C("non-object-int", "42\n"),
        C("number-waits-for-delimiter", S("42", 0), S(" ")),
        C("non-object-string", '"x"'),
        C("non-object-array", "[]"),
        C("non-object-null", "null\n"),
        C("non-object-true", "true\n"),
        C("non-object-float", "1.5\n"),
        C("empty-object", "{}"),
        C("unknown-member", cmd("query-version", foo=1)),
        C("unknown-member-with-id", cmd("query-version", id=3, foo=1)),
        C("control-member", cmd("query-version", control={})),
        C("execute-int", cmd(42)),
        C("execute-null", '{"execute": null}'),
        C("execute-list", cmd(["query-version"])),
        C("execute-empty-string", cmd("")),
        C("arguments-int", cmd("query-version", 42)),
        C("arguments-list", cmd("query-version", [])),
        C("arguments-string", cmd("query-version", "x")),
        C("arguments-null", '{"execute": "query-version", "arguments": null}'),
        C("arguments-empty", cmd("query-version", {})),
        C("arguments-unexpected", cmd("query-version", {"x": 1})),
        C("missing-execute", cmd(None, {}, id=5)),
        C("only-id", '{"id": 1}'),
        C("unknown-command", cmd("no-such-command")),
        C("unknown-command-with-args", cmd("no-such-command", {"a": 1}, id="u")),
        C("exec-oob-not-enabled", cmd("query-version", key="exec-oob", id=1)),
        C("exec-oob-query-version", cmd("query-version", key="exec-oob", id=1),
          negotiate="oob"),
        C("exec-oob-caps", cmd("qmp_capabilities", key="exec-oob", id=1), negotiate="oob"),
        C("exec-oob-unknown", cmd("nope", key="exec-oob", id=1), negotiate="oob"),
        C("exec-oob-int", cmd(42, key="exec-oob"), negotiate="oob"),
        C("exec-oob-without-id", cmd("query-version", key="exec-oob"), negotiate="oob"),
        C("execute-and-exec-oob",
          '{"execute": "query-version", "exec-oob": "query-version", "id": 2}',
          negotiate="oob"),
        C("execute-and-exec-oob-plain",
          '{"execute": "query-version", "exec-oob": "query-version", "id": 2}'),
        C("execute-with-oob-enabled", cmd("query-version", id=[1]), negotiate="oob"),
        C("three-in-one-chunk",
          S(cmd("query-version", id=1) + cmd("nope", id=2) + cmd("query-version", id=3), 3)),
        C("split-across-chunks", S('{"execute":', 0), S(' "query-version", "id"', 0),
          S(': "s"}\n')),
        C("whitespace-padding", S("  \n\t\r\n " + cmd("query-version") + " \n\n ")),
    ]
    ids: list[tuple[str, Any]] = [
        ("int", 1), ("negative", -7), ("zero", 0), ("float", 2.5), ("big-int", 2 ** 62),
        ("string", "abc"), ("empty-string", ""), ("unicode", "\u00e9\u4e2d"),
        ("null", None), ("true", True), ("false", False),
        ("list", [1, "a", None]), ("empty-list", []), ("object", {"a": {"b": [1]}}),
        ("empty-object", {}),
    ]
    for label, value in ids:
        cases.append(C(f"id-{label}", cmd("query-version", id=value)))
    for label in ("string", "null", "object", "float"):
        value = dict(ids)[label]
        cases.append(C(f"id-{label}-unknown-command", cmd("nope", id=value)))
        cases.append(C(f"id-{label}-bad-arguments", cmd("query-version", {"x": 1}, id=value)))
    cases.append(C("id-with-envelope-error", cmd(42, id="e")))
    cases.append(C("id-with-non-object-arguments", cmd("query-version", 1, id="e")))
    return cases


def parse_cases() -> list[Case]:
    good = cmd("query-version", id="good")
    return [
        C("truncated-then-completed", S('{"execute": "query-version"', 0), S("}")),
        C("truncated-then-garbage", S('{"execute": "query-version"', 0), S("@")),
        C("garbage-word", "foo"),
        C("garbage-at", "@"),
        C("garbage-then-good-same-chunk", S("foo " + good, 2)),
        C("garbage-then-good-next-chunk", S("foo"), S(good)),
        C("stray-close-bracket", "]"),
        C("stray-close-brace", "}"),
        C("extra-close-brace", S(cmd("query-version") + "}", 2)),
        C("mismatched-brackets", '{"execute": [}]'),
        C("unbalanced-open", S("[[[", 0), S("]]]")),
        C("unbalanced-open-object", S('{"a": {"b": {', 0), S(" }}}")),
        C("nesting-1024", "[" * 1024 + "]" * 1024),
        C("nesting-1025", S("[" * 1025 + "]" * 1025)),
        C("nesting-1025-objects", S('{"a":' * 1025 + "1" + "}" * 1025)),
        C("nesting-1025-then-good", S("[" * 1025 + "]" * 1025 + good)),
        C("single-quoted", "{'execute': 'query-version', 'id': 'sq'}"),
        C("single-quoted-escapes", "{'execute': 'query-version', 'id': 'a\\'b\"c'}"),
        C("invalid-utf8-in-string", S(b'{"execute": "query-\xff", "id": 1}')),
        C("invalid-utf8-outside-string", S(b"\xff" + good.encode())),
        C("overlong-utf8", S(b'{"execute": "query-version", "id": "\xc0\xaf"}')),
        C("truncated-utf8", S(b'{"execute": "query-version", "id": "\xe4\xb8"}')),
        C("utf8-surrogate-encoded", S(b'{"execute": "query-version", "id": "\xed\xa0\x80"}')),
        C("valid-utf8-id", S('{"execute": "query-version", "id": "\u00fc\u20ac\U0001F600"}')),
        C("byte-0xfe", S(b"\xfe")),
        C("nul-byte", S(b"\x00" + good.encode())),
        C("huge-int-id", '{"execute": "query-version", "id": 99999999999999999999999}'),
        C("uint64-max-plus-one-id", '{"execute": "query-version", "id": 18446744073709551616}'),
        C("int64-min-minus-one-id", '{"execute": "query-version", "id": -9223372036854775809}'),
        C("uint64-id", '{"execute": "query-version", "id": 18446744073709551615}'),
        C("exponent-id", '{"execute": "query-version", "id": 1e400}'),
        C("float-id-exponent", '{"execute": "query-version", "id": 1.5E+3}'),
        C("negative-zero-id", '{"execute": "query-version", "id": -0}'),
        C("leading-zero-number", '{"execute": "query-version", "id": 012}'),
        C("hex-number", '{"execute": "query-version", "id": 0x10}'),
        C("dot-number", '{"execute": "query-version", "id": .5}'),
        C("trailing-dot-number", '{"execute": "query-version", "id": 1.}'),
        C("nan", '{"execute": "query-version", "id": NaN}'),
        C("capitalised-true", '{"execute": "query-version", "id": True}'),
        C("duplicate-key", '{"execute": "query-version", "execute": "query-version"}'),
        C("duplicate-id", '{"execute": "query-version", "id": 1, "id": 2}'),
        C("trailing-comma-object", '{"execute": "query-version",}'),
        C("trailing-comma-array", '{"execute": "query-version", "id": [1,]}'),
        C("missing-colon", '{"execute" "query-version"}'),
        C("missing-comma", '{"execute": "query-version" "id": 1}'),
        C("non-string-key", '{1: 2}'),
        C("control-char-in-string", S(b'{"execute": "query-version", "id": "a\x01b"}')),
        C("tab-in-string", S(b'{"execute": "query-version", "id": "a\tb"}')),
        C("newline-in-string", S(b'{"execute": "query-version", "id": "a\nb"}')),
        C("escaped-nul", '{"execute": "query-version", "id": "a\\u0000b"}'),
        C("escaped-unicode", '{"execute": "query-version", "id": "\\u00e9\\ud83d\\ude00"}'),
        C("lone-surrogate-escape", '{"execute": "query-version", "id": "\\ud800"}'),
        C("invalid-escape", '{"execute": "query-version", "id": "\\q"}'),
        C("short-unicode-escape", '{"execute": "query-version", "id": "\\u12"}'),
        C("escaped-slash", '{"execute": "query-version", "id": "a\\/b"}'),
        C("interpolation-token", '{"execute": "query-version", "id": %d}'),
        C("blank-lines-only", S("\n\r\n  \n", 0)),
        C("comment", '/* c */ {"execute": "query-version"}'),
        C("long-string-id", cmd("query-version", id="x" * 20000)),
        C("incomplete-value-swallows-next-chunk", S("{'a': ", 0), S(good, 0)),
        C("bad-then-good-in-next-chunk", S("{'a': ]"), S(good)),
    ]


def validation_cases() -> list[Case]:
    def v(name: str, command: str, args: Any) -> Case:
        return C(name, cmd(command, args))

    luks_file = {"driver": "file", "filename": "{tmp}/nope.img"}
    return [
        v("query-version-extra", "query-version", {"x": 1}),
        v("quit-extra", "quit", {"x": 1}),
        v("quit-arguments-list", "quit", []),
        v("query-jobs-extra", "query-jobs", {"x": 1}),
        v("object-add-empty", "object-add", {}),
        v("object-add-missing-id", "object-add", {"qom-type": "secret", "data": "x"}),
        v("object-add-missing-qom-type", "object-add", {"id": "s9", "data": "x"}),
        v("object-add-bad-type", "object-add", {"qom-type": "bogus", "id": "s9"}),
        v("object-add-type-int", "object-add", {"qom-type": 1, "id": "s9"}),
        v("object-add-id-int", "object-add", {"qom-type": "secret", "id": 1, "data": "x"}),
        v("object-add-secret-unknown-prop", "object-add",
          {"qom-type": "secret", "id": "s9", "data": "x", "foo": 1}),
        v("object-add-secret-props", "object-add",
          {"qom-type": "secret", "id": "s9", "props": {"data": "x"}}),
        v("object-add-secret-data-int", "object-add", {"qom-type": "secret", "id": "s9", "data": 1}),
        v("object-add-secret-bad-format", "object-add",
          {"qom-type": "secret", "id": "s9", "data": "x", "format": "hex"}),
        v("object-add-secret-format-int", "object-add",
          {"qom-type": "secret", "id": "s9", "data": "x", "format": 0}),
        v("object-del-missing-id", "object-del", {}),
        v("object-del-id-int", "object-del", {"id": 1}),
        v("object-del-extra", "object-del", {"id": "s9", "x": 1}),
        v("blockdev-add-empty", "blockdev-add", {}),
        v("blockdev-add-bad-driver", "blockdev-add", {"driver": "bogus", "node-name": "n"}),
        v("blockdev-add-driver-int", "blockdev-add", {"driver": 1, "node-name": "n"}),
        v("blockdev-add-unknown-member", "blockdev-add",
          {"driver": "file", "node-name": "n", "filename": "{tmp}/x", "foo": 1}),
        v("blockdev-add-file-missing-filename", "blockdev-add", {"driver": "file", "node-name": "n"}),
        v("blockdev-add-file-filename-int", "blockdev-add",
          {"driver": "file", "node-name": "n", "filename": 3}),
        v("blockdev-add-node-name-int", "blockdev-add",
          {"driver": "file", "node-name": 5, "filename": "{tmp}/x"}),
        v("blockdev-add-read-only-string", "blockdev-add",
          {"driver": "file", "node-name": "n", "filename": "{tmp}/x", "read-only": "yes"}),
        v("blockdev-add-bad-discard", "blockdev-add",
          {"driver": "file", "node-name": "n", "filename": "{tmp}/x", "discard": "bogus"}),
        v("blockdev-add-cache-direct-string", "blockdev-add",
          {"driver": "file", "node-name": "n", "filename": "{tmp}/x", "cache": {"direct": "x"}}),
        v("blockdev-add-luks-missing-file", "blockdev-add",
          {"driver": "luks", "node-name": "n", "key-secret": "s0"}),
        v("blockdev-add-luks-file-number", "blockdev-add",
          {"driver": "luks", "node-name": "n", "key-secret": "s0", "file": 42}),
        v("blockdev-add-luks-file-list", "blockdev-add",
          {"driver": "luks", "node-name": "n", "key-secret": "s0", "file": []}),
        v("blockdev-add-luks-file-null", "blockdev-add",
          {"driver": "luks", "node-name": "n", "key-secret": "s0", "file": None}),
        v("blockdev-add-luks-file-empty", "blockdev-add",
          {"driver": "luks", "node-name": "n", "key-secret": "s0", "file": {}}),
        v("blockdev-add-luks-file-bad-driver", "blockdev-add",
          {"driver": "luks", "node-name": "n", "key-secret": "s0", "file": {"driver": "nope"}}),
        v("blockdev-add-luks-file-missing-filename", "blockdev-add",
          {"driver": "luks", "node-name": "n", "key-secret": "s0", "file": {"driver": "file"}}),
        v("blockdev-add-luks-file-unknown-member", "blockdev-add",
          {"driver": "luks", "node-name": "n", "key-secret": "s0",
           "file": {**luks_file, "foo": 1}}),
        v("blockdev-add-luks-key-secret-int", "blockdev-add",
          {"driver": "luks", "node-name": "n", "key-secret": 1, "file": luks_file}),
        v("blockdev-add-luks-member-of-other-branch", "blockdev-add",
          {"driver": "luks", "node-name": "n", "key-secret": "s0", "file": luks_file,
           "filename": "{tmp}/x"}),
        v("blockdev-add-qcow2-encrypt-bad-format", "blockdev-add",
          {"driver": "qcow2", "node-name": "n", "file": luks_file,
           "encrypt": {"format": "bogus"}}),
        v("blockdev-add-qcow2-encrypt-key-secret-int", "blockdev-add",
          {"driver": "qcow2", "node-name": "n", "file": luks_file,
           "encrypt": {"format": "luks", "key-secret": 1}}),
        v("blockdev-add-qcow2-encrypt-missing-format", "blockdev-add",
          {"driver": "qcow2", "node-name": "n", "file": luks_file,
           "encrypt": {"key-secret": "s0"}}),
        v("blockdev-add-qcow2-encrypt-string", "blockdev-add",
          {"driver": "qcow2", "node-name": "n", "file": luks_file, "encrypt": "luks"}),
        v("blockdev-del-missing-node-name", "blockdev-del", {}),
        v("blockdev-del-node-name-int", "blockdev-del", {"node-name": 1}),
        v("blockdev-del-extra", "blockdev-del", {"node-name": "n", "x": 1}),
        v("amend-empty", "x-blockdev-amend", {}),
        v("amend-missing-options", "x-blockdev-amend", {"job-id": "j", "node-name": "n"}),
        v("amend-missing-job-id", "x-blockdev-amend",
          {"node-name": "n", "options": {"driver": "luks", "state": "active"}}),
        v("amend-options-missing-driver", "x-blockdev-amend",
          {"job-id": "j", "node-name": "n", "options": {}}),
        v("amend-options-bad-driver", "x-blockdev-amend",
          {"job-id": "j", "node-name": "n", "options": {"driver": "bogus"}}),
        v("amend-options-driver-without-amend", "x-blockdev-amend",
          {"job-id": "j", "node-name": "n", "options": {"driver": "file"}}),
        v("amend-luks-missing-state", "x-blockdev-amend",
          {"job-id": "j", "node-name": "n", "options": {"driver": "luks"}}),
        v("amend-luks-bad-state", "x-blockdev-amend",
          {"job-id": "j", "node-name": "n", "options": {"driver": "luks", "state": "on"}}),
        v("amend-luks-keyslot-string", "x-blockdev-amend",
          {"job-id": "j", "node-name": "n",
           "options": {"driver": "luks", "state": "inactive", "keyslot": "1"}}),
        v("amend-luks-keyslot-huge", "x-blockdev-amend",
          {"job-id": "j", "node-name": "n",
           "options": {"driver": "luks", "state": "inactive", "keyslot": 2 ** 63}}),
        v("amend-luks-iter-time-float", "x-blockdev-amend",
          {"job-id": "j", "node-name": "n",
           "options": {"driver": "luks", "state": "active", "iter-time": 1.5}}),
        v("amend-luks-new-secret-int", "x-blockdev-amend",
          {"job-id": "j", "node-name": "n",
           "options": {"driver": "luks", "state": "active", "new-secret": 1}}),
        v("amend-luks-unknown-member", "x-blockdev-amend",
          {"job-id": "j", "node-name": "n",
           "options": {"driver": "luks", "state": "active", "foo": 1}}),
        v("amend-luks-qcow2-member", "x-blockdev-amend",
          {"job-id": "j", "node-name": "n",
           "options": {"driver": "luks", "state": "active", "encrypt": {}}}),
        v("amend-qcow2-encrypt-keyslot-string", "x-blockdev-amend",
          {"job-id": "j", "node-name": "n",
           "options": {"driver": "qcow2",
                       "encrypt": {"format": "luks", "state": "inactive", "keyslot": "x"}}}),
        v("amend-qcow2-encrypt-missing-format", "x-blockdev-amend",
          {"job-id": "j", "node-name": "n",
           "options": {"driver": "qcow2", "encrypt": {"state": "active"}}}),
        v("amend-qcow2-encrypt-qcow-format", "x-blockdev-amend",
          {"job-id": "j", "node-name": "n",
           "options": {"driver": "qcow2", "encrypt": {"format": "qcow", "state": "active"}}}),
        v("amend-force-string", "x-blockdev-amend",
          {"job-id": "j", "node-name": "n", "force": "yes",
           "options": {"driver": "luks", "state": "active"}}),
        v("create-empty", "blockdev-create", {}),
        v("create-missing-options", "blockdev-create", {"job-id": "c"}),
        v("create-options-missing-driver", "blockdev-create", {"job-id": "c", "options": {}}),
        v("create-file-missing-size", "blockdev-create",
          {"job-id": "c", "options": {"driver": "file", "filename": "{tmp}/n"}}),
        v("create-file-size-string", "blockdev-create",
          {"job-id": "c", "options": {"driver": "file", "filename": "{tmp}/n", "size": "1M"}}),
        v("create-file-size-negative", "blockdev-create",
          {"job-id": "c", "options": {"driver": "file", "filename": "{tmp}/n", "size": -1}}),
        v("create-file-size-too-big", "blockdev-create",
          {"job-id": "c", "options": {"driver": "file", "filename": "{tmp}/n",
                                      "size": 18446744073709551616}}),
        v("create-file-size-float", "blockdev-create",
          {"job-id": "c", "options": {"driver": "file", "filename": "{tmp}/n", "size": 1e3}}),
        v("create-luks-missing-file", "blockdev-create",
          {"job-id": "c", "options": {"driver": "luks", "size": 1048576, "key-secret": "s0"}}),
        v("create-luks-bad-cipher", "blockdev-create",
          {"job-id": "c", "options": {"driver": "luks", "file": "f", "size": 1048576,
                                      "key-secret": "s0", "cipher-alg": "rot13"}}),
        v("create-qcow2-encrypt-bad-format", "blockdev-create",
          {"job-id": "c", "options": {"driver": "qcow2", "file": "f", "size": 1048576,
                                      "encrypt": {"format": "bogus"}}}),
        v("query-named-block-nodes-flat-string", "query-named-block-nodes", {"flat": "yes"}),
        v("query-named-block-nodes-extra", "query-named-block-nodes", {"x": 1}),
        v("job-dismiss-missing-id", "job-dismiss", {}),
        v("job-dismiss-id-int", "job-dismiss", {"id": 1}),
        v("job-cancel-missing-id", "job-cancel", {}),
        v("job-cancel-force-string", "job-cancel", {"id": "j", "force": "x"}),
        v("job-finalize-missing-id", "job-finalize", {}),
        v("reopen-missing-options", "blockdev-reopen", {}),
        v("reopen-options-object", "blockdev-reopen", {"options": {}}),
        v("reopen-options-item-int", "blockdev-reopen", {"options": [1]}),
        v("reopen-options-item-missing-driver", "blockdev-reopen", {"options": [{}]}),
        v("reopen-options-item-driver-int", "blockdev-reopen", {"options": [{"driver": 1}]}),
        v("reopen-second-item-bad", "blockdev-reopen",
          {"options": [{"driver": "file", "node-name": "n", "filename": "{tmp}/x"},
                       {"driver": "luks"}]}),
    ]


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


def secret_cases() -> list[Case]:
    key = secret_add("k0", data=b64(SECRET_KEY), format="base64")
    enc_ok = secret_add("e0", data=encrypt_secret(b"pass0"), format="base64", keyid="k0",
                        iv=b64(SECRET_IV))
    files = [{"path": "{tmp}/pw.txt", "text": "pass0"}]
    return [
        C("add-data-then-del", secret_add("s9", data="x"), cmd("object-del", {"id": "s9"}),
          cmd("object-del", {"id": "s9"})),
        C("add-empty-data", secret_add("s9", data="")),
        C("add-file", secret_add("s9", file="{tmp}/pw.txt"), files=files),
        C("add-file-missing", secret_add("s9", file="{tmp}/nope.txt")),
        C("add-file-is-directory", secret_add("s9", file="{tmp}")),
        C("add-base64-good", secret_add("s9", data="cGFzczA=", format="base64")),
        C("add-base64-bad-chars", secret_add("s9", data="!!!!", format="base64")),
        C("add-base64-bad-length", secret_add("s9", data="abc", format="base64")),
        C("add-format-raw", secret_add("s9", data="x", format="raw")),
        C("add-neither-data-nor-file", secret_add("s9")),
        C("add-both-data-and-file", secret_add("s9", data="x", file="{tmp}/pw.txt"), files=files),
        C("add-duplicate-id", secret_add("s9", data="x"), secret_add("s9", data="y")),
        C("add-duplicate-of-cli-object", secret_add("s0", data="y"), daemon_args=SECRETS[:2]),
        C("add-invalid-id", secret_add("9 x", data="x")),
        C("add-id-with-dot", secret_add("a.b", data="x")),
        C("add-encrypted-good", key, enc_ok),
        C("add-encrypted-used-as-luks-key", key, enc_ok, luks_node(key="e0"),
          images=[LUKS_IMG]),
        C("add-encrypted-key-missing",
          secret_add("e0", data=encrypt_secret(b"pass0"), format="base64", keyid="nokey",
                     iv=b64(SECRET_IV))),
        C("add-encrypted-key-wrong-length", secret_add("k1", data="short"),
          secret_add("e0", data=encrypt_secret(b"pass0"), format="base64", keyid="k1",
                     iv=b64(SECRET_IV))),
        C("add-encrypted-no-iv", key,
          secret_add("e0", data=encrypt_secret(b"pass0"), format="base64", keyid="k0")),
        C("add-encrypted-short-iv", key,
          secret_add("e0", data=encrypt_secret(b"pass0"), format="base64", keyid="k0",
                     iv=b64(b"12345678"))),
        C("add-encrypted-bad-iv-base64", key,
          secret_add("e0", data=encrypt_secret(b"pass0"), format="base64", keyid="k0",
                     iv="!!")),
        C("add-encrypted-bad-padding", key,
          secret_add("e0", data=encrypt_secret(b"pass0", pad_value=200), format="base64",
                     keyid="k0", iv=b64(SECRET_IV))),
        C("add-encrypted-bad-data-base64", key,
          secret_add("e0", data="%%%", format="base64", keyid="k0", iv=b64(SECRET_IV))),
        C("add-encrypted-not-block-multiple", key,
          secret_add("e0", data=b64(b"0123456789"), format="base64", keyid="k0",
                     iv=b64(SECRET_IV))),
        C("del-missing", cmd("object-del", {"id": "nope"})),
        C("del-cli-object", cmd("object-del", {"id": "s0"}), daemon_args=SECRETS[:2]),
        C("del-in-use-by-open-luks-node", luks_node(), cmd("object-del", {"id": "s0"}),
          cmd("query-named-block-nodes", {"flat": True}),
          images=[LUKS_IMG], daemon_args=SECRETS),
        C("del-key-of-encrypted-secret", key, enc_ok, cmd("object-del", {"id": "k0"}),
          luks_node(key="e0"), images=[LUKS_IMG]),
    ]


def amend(job: str, node: str, options: dict, **extra: Any) -> str:
    return cmd("x-blockdev-amend", {"job-id": job, "node-name": node, "options": options,
                                    **extra})


def run_job(send: str, job: str) -> Step:
    """A job-starting command; read until the job concludes."""
    return S(send, 1, [job_event(job, "concluded")])


def dismiss(job: str) -> Step:
    return S(cmd("job-dismiss", {"id": job}), 1, [job_event(job, "null")])


#: qsd 7.2 takes iter-time 0 and writes a slot with the minimum iterations;
#: qmpd refuses a zero or negative iter-time with a clear error, as its spec asks.
ZERO_ITER_TIME = {"note": "qmpd refuses iter-time 0 (the job fails with a clear error)",
                  "skip": ["steps[1].events", "steps[2].replies", "steps[4].replies",
                           "steps[5].replies"]}


def amend_case(name: str, options: dict, *, node: str = "l0", image: dict = LUKS_IMG,
               before: Iterable[str | Step] = (), extra: dict | None = None, **kw: Any) -> Case:
    """Open a node, amend it, read the job's life, dismiss it, look again."""
    open_node = luks_node() if image is LUKS_IMG else qcow2_node()
    return C(name, open_node, *before,
             run_job(amend("j0", node, options, **(extra or {})), "j0"),
             cmd("query-jobs"), dismiss("j0"), cmd("query-jobs"),
             cmd("query-named-block-nodes", {"flat": True}),
             images=[image], daemon_args=SECRETS, **kw)


def qcow2_node(name: str = "q0", key: str = "s0") -> str:
    return cmd("blockdev-add", {"driver": "qcow2", "node-name": name,
                                "encrypt": {"format": "luks", "key-secret": key},
                                "file": {"driver": "file", "filename": "{tmp}/q.qcow2"}})


def add_key(secret: str = "s1", **more: Any) -> dict:
    return {"driver": "luks", "state": "active", "new-secret": secret, "iter-time": 10, **more}


def erase(**more: Any) -> dict:
    return {"driver": "luks", "state": "inactive", **more}


#: qsd opens files in its main loop; qmpd in a worker thread.
FILE_OPEN_IN_THREAD = {"note": "qsd creates the file in its main loop before it answers; qmpd opens files in a worker thread (the event loop never waits on a filesystem), so the failure's events follow the reply",
                       "skip": ["steps[0].order"]}


def block_cases() -> list[Case]:
    img = {"images": [LUKS_IMG], "daemon_args": SECRETS}
    both = {"images": [LUKS_IMG, QCOW_IMG], "daemon_args": SECRETS}
    qnodes = cmd("query-named-block-nodes", {"flat": True})
    add_s1 = run_job(amend("a1", "l0", add_key()), "a1")
    cases = [
        C("query-named-block-nodes-empty", cmd("query-named-block-nodes")),
        C("query-jobs-empty", cmd("query-jobs")),
        C("luks-right-key", luks_node(), qnodes, **img),
        C("luks-right-key-not-flat", luks_node(), cmd("query-named-block-nodes"), **img),
        C("luks-read-only", luks_node(**{"read-only": True}), qnodes, **img),
        C("luks-wrong-key", luks_node(key="bad"), qnodes, **img),
        C("luks-missing-key-secret",
          cmd("blockdev-add", {"driver": "luks", "node-name": "l0",
                               "file": {"driver": "file", "filename": "{tmp}/a.img"}}), **img),
        C("luks-unknown-key-secret", luks_node(key="nope"), **img),
        C("luks-missing-file", luks_node(path="{tmp}/nope.img"), **img),
        C("luks-on-raw-image", luks_node(path="{tmp}/r.img"),
          images=[{"path": "{tmp}/r.img", "format": "raw", "size": "1M"}], daemon_args=SECRETS),
        C("luks-over-qcow2-file", luks_node(path="{tmp}/q.qcow2"), **both),
        C("luks-file-by-reference",
          cmd("blockdev-add", {"driver": "file", "node-name": "f0", "filename": "{tmp}/a.img"}),
          cmd("blockdev-add", {"driver": "luks", "node-name": "l0", "key-secret": "s0",
                               "file": "f0"}),
          qnodes, cmd("query-named-block-nodes"), **img),
        C("luks-file-reference-missing",
          cmd("blockdev-add", {"driver": "luks", "node-name": "l0", "key-secret": "s0",
                               "file": "f9"}), **img),
        C("file-node", cmd("blockdev-add", {"driver": "file", "node-name": "f0",
                                            "filename": "{tmp}/a.img"}), qnodes, **img),
        C("file-missing", cmd("blockdev-add", {"driver": "file", "node-name": "f0",
                                               "filename": "{tmp}/nope.img"})),
        C("qcow2-luks", qcow2_node(), qnodes, cmd("query-named-block-nodes"), **both),
        C("qcow2-luks-wrong-key", qcow2_node(key="bad"), **both),
        C("qcow2-luks-no-encrypt-options",
          cmd("blockdev-add", {"driver": "qcow2", "node-name": "q0",
                               "file": {"driver": "file", "filename": "{tmp}/q.qcow2"}}),
          **both),
        C("qcow2-on-luks-file",
          cmd("blockdev-add", {"driver": "qcow2", "node-name": "q0",
                               "file": {"driver": "file", "filename": "{tmp}/a.img"}}), **both),
        C("duplicate-node-name", luks_node(), luks_node(), **img),
        C("duplicate-node-name-of-child",
          cmd("blockdev-add", {"driver": "luks", "node-name": "l0", "key-secret": "s0",
                               "file": {"driver": "file", "node-name": "l0",
                                        "filename": "{tmp}/a.img"}}), **img),
        C("invalid-node-name-digit", luks_node(name="1abc"), **img),
        C("invalid-node-name-chars", luks_node(name="a b"), **img),
        C("invalid-node-name-hash", luks_node(name="#block1"), **img),
        C("node-name-too-long", luks_node(name="n" * 40), **img),
        C("root-without-node-name",
          cmd("blockdev-add", {"driver": "luks", "key-secret": "s0",
                               "file": {"driver": "file", "filename": "{tmp}/a.img"}}), **img),
        C("blockdev-del-missing", cmd("blockdev-del", {"node-name": "nope"})),
        C("blockdev-del-luks", luks_node(), cmd("blockdev-del", {"node-name": "l0"}),
          cmd("query-named-block-nodes"), **img),
        C("blockdev-del-in-use",
          cmd("blockdev-add", {"driver": "file", "node-name": "f0", "filename": "{tmp}/a.img"}),
          cmd("blockdev-add", {"driver": "luks", "node-name": "l0", "key-secret": "s0",
                               "file": "f0"}),
          cmd("blockdev-del", {"node-name": "f0"}), cmd("blockdev-del", {"node-name": "l0"}),
          cmd("blockdev-del", {"node-name": "f0"}), **img),
        C("blockdev-del-implicit-child", luks_node(), qnodes, **img),
        amend_case("amend-add-key", add_key()),
        amend_case("amend-add-key-in-slot-3", add_key(keyslot=3)),
        amend_case("amend-add-key-in-active-slot", add_key(keyslot=0)),
        amend_case("amend-add-key-slot-8", add_key(keyslot=8)),
        amend_case("amend-add-key-slot-negative", add_key(keyslot=-1)),
        amend_case("amend-add-key-without-new-secret",
                   {"driver": "luks", "state": "active"}),
        amend_case("amend-add-key-unknown-secret", add_key("nope")),
        amend_case("amend-add-key-unknown-old-secret", add_key(**{"old-secret": "nope"})),
        amend_case("amend-add-key-wrong-old-secret", add_key(**{"old-secret": "bad"})),
        amend_case("amend-add-key-right-old-secret", add_key(**{"old-secret": "s0"})),
        amend_case("amend-add-key-zero-iter-time", add_key(**{"iter-time": 0}),
                   difference=ZERO_ITER_TIME),
        amend_case("amend-erase-by-secret", erase(**{"old-secret": "s0"}), before=[add_s1]),
        amend_case("amend-erase-by-slot", erase(keyslot=1), before=[add_s1]),
        amend_case("amend-erase-only-slot", erase(keyslot=0)),
        amend_case("amend-erase-only-slot-forced", erase(keyslot=0), extra={"force": True}),
        amend_case("amend-erase-only-matching-secret", erase(**{"old-secret": "s0"})),
        amend_case("amend-erase-unmatched-secret", erase(**{"old-secret": "s2"})),
        amend_case("amend-erase-inactive-slot", erase(keyslot=5)),
        amend_case("amend-erase-slot-8", erase(keyslot=8)),
        amend_case("amend-erase-neither", erase()),
        amend_case("amend-erase-both-slot-and-secret",
                   erase(keyslot=1, **{"old-secret": "s1"}), before=[add_s1]),
        amend_case("amend-erase-with-new-secret",
                   erase(keyslot=1, **{"new-secret": "s1"}), before=[add_s1]),
        amend_case("amend-erase-with-iter-time",
                   erase(keyslot=1, **{"iter-time": 10}), before=[add_s1]),
        amend_case("amend-erase-all-matching-two-slots", erase(**{"old-secret": "s0"}),
                   before=[run_job(amend("a1", "l0", add_key("s0")), "a1")]),
        amend_case("amend-qcow2-add-key",
                   {"driver": "qcow2", "encrypt": {"format": "luks", "state": "active",
                                                   "new-secret": "s1", "iter-time": 10}},
                   node="q0", image=QCOW_IMG),
        amend_case("amend-qcow2-erase-only-slot",
                   {"driver": "qcow2", "encrypt": {"format": "luks", "state": "inactive",
                                                   "keyslot": 0}},
                   node="q0", image=QCOW_IMG),
        amend_case("amend-qcow2-node-with-luks-options", add_key(), node="q0", image=QCOW_IMG),
        amend_case("amend-luks-node-with-qcow2-options",
                   {"driver": "qcow2", "encrypt": {"format": "luks", "state": "active",
                                                   "new-secret": "s1"}}),
        amend_case("amend-qcow2-without-encrypt", {"driver": "qcow2"}, node="q0",
                   image=QCOW_IMG),
        C("amend-file-node",
          cmd("blockdev-add", {"driver": "file", "node-name": "f0", "filename": "{tmp}/a.img"}),
          amend("j0", "f0", {"driver": "file"}), amend("j1", "f0", add_key()),
          cmd("query-jobs"), **img),
        amend_case("amend-read-only-node", add_key(),
                   before=[cmd("blockdev-del", {"node-name": "l0"}),
                           luks_node(**{"read-only": True})]),
        C("amend-missing-node", amend("j0", "nope", add_key()), cmd("query-jobs"),
          daemon_args=SECRETS),
        C("amend-invalid-job-id", luks_node(), amend("1x", "l0", add_key()), **img),
        C("amend-duplicate-job-id", luks_node(), run_job(amend("j0", "l0", add_key()), "j0"),
          amend("j0", "l0", add_key("s2")), cmd("query-jobs"), **img),
        C("amend-while-concluded-job-holds-node", luks_node(),
          run_job(amend("j0", "l0", add_key()), "j0"),
          run_job(amend("j1", "l0", add_key("s2")), "j1"), cmd("query-jobs"), **img),
        C("amend-fill-all-slots", luks_node(),
          *[run_job(amend(f"j{i}", "l0", add_key("s1")), f"j{i}") for i in range(1, 8)],
          run_job(amend("j8", "l0", add_key("s2")), "j8"), cmd("query-jobs"), qnodes, **img),
        C("amend-then-reopen-with-new-key", luks_node(),
          run_job(amend("j0", "l0", add_key()), "j0"), dismiss("j0"),
          cmd("blockdev-del", {"node-name": "l0"}), luks_node(key="s1"), qnodes, **img),
        C("amend-erase-then-old-key-fails", luks_node(),
          run_job(amend("j0", "l0", add_key()), "j0"), dismiss("j0"),
          run_job(amend("j1", "l0", erase(**{"old-secret": "s0"})), "j1"), dismiss("j1"),
          cmd("blockdev-del", {"node-name": "l0"}), luks_node(), luks_node(key="s1"), **img),
        C("job-dismiss-unknown", cmd("job-dismiss", {"id": "nope"})),
        C("job-cancel-unknown", cmd("job-cancel", {"id": "nope"})),
        C("job-finalize-unknown", cmd("job-finalize", {"id": "nope"})),
        C("job-verbs-on-concluded", luks_node(), run_job(amend("j0", "l0", add_key()), "j0"),
          cmd("job-cancel", {"id": "j0"}), cmd("job-finalize", {"id": "j0"}),
          cmd("job-complete", {"id": "j0"}), cmd("job-pause", {"id": "j0"}),
          dismiss("j0"), cmd("job-dismiss", {"id": "j0"}), **img),
        C("create-file", run_job(cmd("blockdev-create", {"job-id": "c0", "options": {
            "driver": "file", "filename": "{tmp}/new.img", "size": 1048576}}), "c0"),
          cmd("query-jobs"), dismiss("c0"), cmd("query-jobs"),
          cmd("blockdev-add", {"driver": "file", "node-name": "f0",
                               "filename": "{tmp}/new.img"}), qnodes),
        C("create-file-exists", run_job(cmd("blockdev-create", {"job-id": "c0", "options": {
            "driver": "file", "filename": "{tmp}/a.img", "size": 1048576}}), "c0"),
          cmd("query-jobs"), **img),
        C("create-file-bad-dir", run_job(cmd("blockdev-create", {"job-id": "c0", "options": {
            "driver": "file", "filename": "{tmp}/no/such/dir.img", "size": 1048576}}), "c0"),
          cmd("query-jobs"), difference=FILE_OPEN_IN_THREAD),
        C("create-luks", *create_luks_steps(), **img),
        C("create-luks-unknown-file-node", run_job(cmd("blockdev-create", {
            "job-id": "c1", "options": {"driver": "luks", "file": "nope", "size": 1048576,
                                        "key-secret": "s0", "iter-time": 10}}), "c1"),
          cmd("query-jobs"), daemon_args=SECRETS),
        C("create-luks-missing-key-secret", *create_luks_steps(key=None), **img),
        C("create-luks-unknown-key-secret", *create_luks_steps(key="nope"), **img),
        C("create-qcow2-luks", *create_qcow2_steps(), **img),
        C("create-duplicate-job-id", run_job(cmd("blockdev-create", {"job-id": "c0", "options": {
            "driver": "file", "filename": "{tmp}/n1.img", "size": 65536}}), "c0"),
          cmd("blockdev-create", {"job-id": "c0", "options": {
              "driver": "file", "filename": "{tmp}/n2.img", "size": 65536}})),
    ]
    return cases


def create_luks_steps(key: str | None = "s0") -> list[Step | str]:
    opts: dict[str, Any] = {"driver": "luks", "file": "f0", "size": 4194304, "iter-time": 10}
    if key is not None:
        opts["key-secret"] = key
    steps: list[Step | str] = [
        run_job(cmd("blockdev-create", {"job-id": "c0", "options": {
            "driver": "file", "filename": "{tmp}/new.img", "size": 0}}), "c0"),
        dismiss("c0"),
        cmd("blockdev-add", {"driver": "file", "node-name": "f0", "filename": "{tmp}/new.img"}),
        run_job(cmd("blockdev-create", {"job-id": "c1", "options": opts}), "c1"),
        cmd("query-jobs"), dismiss("c1"),
    ]
    if key is not None:
        steps += [cmd("blockdev-add", {"driver": "luks", "node-name": "l1", "key-secret": key,
                                       "file": "f0"}),
                  cmd("query-named-block-nodes", {"flat": True})]
    return steps


def create_qcow2_steps() -> list[Step | str]:
    return [
        run_job(cmd("blockdev-create", {"job-id": "c0", "options": {
            "driver": "file", "filename": "{tmp}/new.qcow2", "size": 0}}), "c0"),
        dismiss("c0"),
        cmd("blockdev-add", {"driver": "file", "node-name": "f0",
                             "filename": "{tmp}/new.qcow2"}),
        run_job(cmd("blockdev-create", {"job-id": "c1", "options": {
            "driver": "qcow2", "file": "f0", "size": 4194304,
            "encrypt": {"format": "luks", "key-secret": "s0", "iter-time": 10}}}), "c1"),
        cmd("query-jobs"), dismiss("c1"),
        cmd("blockdev-add", {"driver": "qcow2", "node-name": "q1", "file": "f0",
                             "encrypt": {"format": "luks", "key-secret": "s0"}}),
        cmd("query-named-block-nodes", {"flat": True}),
    ]


from tests.tools import qsd_cases_exports  # noqa: E402  (its cases use the helpers above)
from tests.tools.qsd_cases_block_io import block_io_cases  # noqa: E402
from tests.tools.qsd_cases_ciphers import cipher_cases  # noqa: E402

GROUPS: dict[str, Callable[[], list[Case]]] = {
    "greeting": greeting_cases,
    "envelope": envelope_cases,
    "parse": parse_cases,
    "validation": validation_cases,
    "secrets": secret_cases,
    "block": block_cases,
    "exports": lambda: qsd_cases_exports.exports_cases(),
    "block-io": block_io_cases,
    "ciphers": cipher_cases,
}


def qsd_version() -> str:
    out = subprocess.run(["qemu-storage-daemon", "--version"], capture_output=True, text=True)
    return out.stdout.splitlines()[0].strip()


def load_group(group: str) -> dict:
    path = DATA_DIR / f"{group}.json"
    return json.loads(path.read_text()) if path.exists() else {"cases": []}


def record_group(group: str, only: set[str] | None = None) -> Path:
    cases = GROUPS[group]()
    old = {c["name"]: c for c in load_group(group)["cases"]}
    names = [c.name for c in cases]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise SystemExit(f"duplicate case names in {group}: {sorted(dup)}")
    out = []
    for case in cases:
        if only and case.name not in only and case.name in old:
            out.append(old[case.name])
            continue
        print(f"{group}/{case.name}", file=sys.stderr, flush=True)
        out.append(record_case(case))
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    path = DATA_DIR / f"{group}.json"
    doc = {"group": group, "recorded_with": qsd_version(),
           "note": "written by tests/tools/record_qsd.py; replayed by "
                   "tests/integration/test_qsd_reference.py",
           "cases": out}
    path.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    return path


def check_group(group: str, only: set[str] | None = None) -> int:
    """Replay the recorded cases against qsd again: is the recording stable?"""
    bad = 0
    for case in load_group(group)["cases"]:
        if only and case["name"] not in only:
            continue
        problems = compare(case, play_qsd(case))
        if problems:
            bad += 1
            print(f"UNSTABLE {group}/{case['name']}:\n" + "\n".join(problems), flush=True)
    return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group", action="append", choices=sorted(GROUPS),
                        help="record only this group (repeatable)")
    parser.add_argument("--case", action="append",
                        help="re-record only this case, keep the others (repeatable)")
    parser.add_argument("--check", action="store_true",
                        help="do not record: replay the recorded cases against qsd "
                             "and report the ones whose answers changed")
    ns = parser.parse_args(argv)
    only = set(ns.case) if ns.case else None
    if ns.check:
        return 1 if sum(check_group(g, only) for g in ns.group or list(GROUPS)) else 0
    for group in ns.group or list(GROUPS):
        print(record_group(group, only))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
