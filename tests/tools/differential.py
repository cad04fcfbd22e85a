"""Differential runs: the same seeded QMP sequence against qsd 7.2 and qmpd.

A *sequence* (:func:`generate`) is a list of QMP commands drawn from a seeded
``random.Random``: x-blockdev-amend (add a key, erase one; keyslots, force,
wrong secrets, iter-time 10..50), blockdev-create (file, luks, qcow2 with
valid-ish and bad options), blockdev-reopen (read-only flips, missing or
changed key-secret), job verbs and query-named-block-nodes. It runs on
identical copies of two images (a raw LUKS1 image from ``cryptsetup
luksFormat`` and a qcow2+LUKS image from qemu-img), opened as nodes ``l0``
and ``q0`` at the start, once against a qemu-storage-daemon subprocess and
once against a qmpd subprocess.

Every step sends one command and reads with tests/tools/qsd_transcript.py's
:class:`Wire`: the reply, and for a command that starts a job every event up
to that job's ``concluded`` (so jobs never overlap, as in the recorder). The
transcripts are normalised with qsd_transcript's :class:`Normaliser` and compared
step by step: replies, events and their interleaving. At the end both
daemons are stopped and the images' unlock state (which passphrases open
each image) is compared.

The README's "Known differences" that a sequence can reach are folded here,
each narrowly (see :func:`fold_known`):

- the amend lock: qmpd releases it when an amend job concludes, qsd only at
  job-dismiss; an amend or reopen that qsd refuses with "Failed to get ...
  lock" / "is in use" while an earlier amend job on the node is still
  undismissed is not compared (and the sequence after it diverges in state,
  so the run stops comparing at that step and reports it as folded);
- blockdev-create of a file that cannot be opened: the job's events around
  the reply are compared as a set, not in order;
- blockdev-create with a cipher qmpd does not implement (Serpent, Twofish,
  CAST5-CTR), where the answers differ: the run stops comparing there;
- SHUTDOWN events (qmpd sends one when stopped, qsd none) are dropped.
  iter-time 0 is never generated.

Run by hand: ``.venv/bin/python -m tests.tools.differential --seed N --count M``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from tests.processes import accepts, stop
from tests.tools.qsd_transcript import Normaliser, Wire, is_event, start_qsd

PASSPHRASES = {"s0": "pass0", "s1": "pass1", "s2": "pass2", "s3": "pass3", "bad": "wrong"}
SECRET_ARGS = [a for sid, p in PASSPHRASES.items()
               for a in ("--object", f"secret,id={sid},data={p}")]
#: Secret ids a sequence may name: the daemon's, plus one that does not exist.
SECRET_IDS = [*PASSPHRASES, "nosuch"]
IMAGE_SIZE = "4M"
#: Nodes every sequence opens first: name -> (driver, image file name).
NODES = {"l0": ("luks", "l.img"), "q0": ("qcow2", "q.qcow2")}
CREATE_FILES = ("c0.img", "c1.img")


def cmd(name: str, args: Any = None) -> dict:
    msg: dict[str, Any] = {"execute": name}
    if args is not None:
        msg["arguments"] = args
    return msg


# --------------------------------------------------------------------------
# Images


def make_images(directory: str) -> None:
    """The pristine images a sequence starts from (pass0 in slot 0)."""
    from tests.oracles import qemu_img_create_luks, require, run
    require("cryptsetup")
    luks = os.path.join(directory, "l.img")
    with open(luks, "wb") as f:
        f.truncate(4 << 20)
    run(["cryptsetup", "luksFormat", "--batch-mode", "--type", "luks1",
         "--pbkdf-force-iterations", "1000", "--key-file", "-", luks], input=b"pass0")
    qemu_img_create_luks(os.path.join(directory, "q.qcow2"), "pass0", size=IMAGE_SIZE,
                         fmt="qcow2")
    for name in CREATE_FILES:
        open(os.path.join(directory, name), "wb").close()


def unlock_state(directory: str) -> dict[str, list[str]]:
    """Which passphrases open each image (cryptsetup for raw LUKS, qemu-io for qcow2)."""
    from tests.oracles import cryptsetup_unlocks
    out: dict[str, list[str]] = {}
    for name in ("l.img", "c0.img"):
        path = os.path.join(directory, name)
        if subprocess.run(["cryptsetup", "isLuks", path], capture_output=True).returncode:
            out[name] = ["not luks"]
            continue
        out[name] = [p for p in sorted(set(PASSPHRASES.values()))
                     if cryptsetup_unlocks(path, p.encode())]
    for name in ("q.qcow2", "c1.img"):
        path = os.path.join(directory, name)
        opened = []
        for p in sorted(set(PASSPHRASES.values())):
            proc = subprocess.run(
                ["qemu-io", "-r", "--object", f"secret,id=k,data={p}", "--image-opts",
                 f"driver=qcow2,encrypt.key-secret=k,file.filename={path}",
                 "-c", "read 0 512"], capture_output=True, text=True)
            if proc.returncode == 0 and "read 512/512" in proc.stdout:
                opened.append(p)
        out[name] = opened
    return out


# --------------------------------------------------------------------------
# Sequences


@dataclass
class Step:
    msg: dict
    job: str | None = None      # the job this command starts, if any

    def until(self) -> list[dict]:
        if self.job is None:
            return []
        return [{"event": "JOB_STATUS_CHANGE", "data": {"id": self.job, "status": "concluded"}}]


def prologue() -> list[Step]:
    steps = []
    for node, (driver, fname) in NODES.items():
        file_ref = {"driver": "file", "node-name": f"f{node}", "filename": f"{{tmp}}/{fname}"}
        args: dict[str, Any] = {"driver": driver, "node-name": node, "file": file_ref}
        if driver == "luks":
            args["key-secret"] = "s0"
        else:
            args["encrypt"] = {"format": "luks", "key-secret": "s0"}
        steps.append(Step(cmd("blockdev-add", args)))
    for i, fname in enumerate(CREATE_FILES):
        steps.append(Step(cmd("blockdev-add", {"driver": "file", "node-name": f"c{i}",
                                               "filename": f"{{tmp}}/{fname}"})))
    return steps


class Generator:
    def __init__(self, seed: int):
        self.r = random.Random(seed)
        self.jobs = 0
        self.q0_read_only = False

    def job_id(self) -> str:
        # mostly fresh ids, sometimes one that may still be in use
        if self.jobs and self.r.random() < 0.1:
            return f"j{self.r.randrange(self.jobs)}"
        self.jobs += 1
        return f"j{self.jobs - 1}"

    def secret(self, good: float = 0.8) -> str:
        if self.r.random() < good:
            return self.r.choice(["s0", "s1", "s2", "s3"])
        return self.r.choice(["bad", "nosuch"])

    def maybe(self, p: float = 0.5) -> bool:
        return self.r.random() < p

    def luks_amend_options(self) -> dict:
        r = self.r
        o: dict[str, Any] = {}
        if self.maybe(0.6):
            o["state"] = "active"
            if self.maybe(0.95):
                o["new-secret"] = self.secret()
            if self.maybe(0.4):
                o["old-secret"] = self.secret()
            o["iter-time"] = r.randint(10, 50)
        else:
            o["state"] = "inactive"
            if self.maybe(0.5):
                o["old-secret"] = self.secret()
            if self.maybe(0.1):
                o["new-secret"] = self.secret()
        if self.maybe(0.5):
            o["keyslot"] = r.choice([0, 1, 2, 3, 7, 8, -1])
        if self.maybe(0.2):
            o["force"] = True
        return o

    def amend(self) -> Step:
        node = self.r.choice(list(NODES))
        if node == "q0" and self.q0_read_only:
            node = "l0"     # qsd 7.2 aborts (error_setv assertion) amending a read-only qcow2
        driver = NODES[node][0] if self.maybe(0.95) else self.r.choice(["luks", "qcow2"])
        o = self.luks_amend_options()
        force = o.pop("force", None)
        if driver == "luks":
            options = {"driver": "luks", **o}
        else:
            options = {"driver": "qcow2", "encrypt": {"format": "luks", **o}}
        args: dict[str, Any] = {"job-id": self.job_id(), "node-name": node, "options": options}
        if force is not None:
            args["force"] = force
        return Step(cmd("x-blockdev-amend", args), job=args["job-id"])

    def create(self) -> Step:
        r = self.r
        kind = r.choice(["file", "luks", "qcow2"])
        size = r.choice([0, 512, 1 << 20, 3 << 20, 1000, -1])
        if kind == "file":
            name = r.choice(["n0.img", "n1.img", "nodir/x.img"])
            options: dict[str, Any] = {"driver": "file", "filename": f"{{tmp}}/{name}",
                                       "size": size}
            if self.maybe(0.2):
                options["preallocation"] = r.choice(["off", "full", "falloc", "metadata"])
        elif kind == "luks":
            options = {"driver": "luks", "file": r.choice(["c0", "c0", "nosuchnode"]),
                       "size": size, "iter-time": r.randint(10, 50)}
            if self.maybe(0.9):
                options["key-secret"] = self.secret()
            if self.maybe(0.4):
                options["cipher-alg"] = r.choice(["aes-128", "aes-256", "twofish-128",
                                                  "cast5-128", "des"])
            if self.maybe(0.3):
                options["cipher-mode"] = r.choice(["xts", "cbc", "ctr", "ecb"])
            if self.maybe(0.2):
                options["ivgen-alg"] = r.choice(["plain64", "essiv", "plain"])
            if self.maybe(0.2):
                options["hash-alg"] = r.choice(["sha256", "sha1", "md5", "sha512"])
        else:
            options = {"driver": "qcow2", "file": r.choice(["c1", "c1", "nosuchnode"]),
                       "size": size}
            if self.maybe(0.8):
                enc: dict[str, Any] = {"format": "luks", "iter-time": r.randint(10, 50)}
                if self.maybe(0.9):
                    enc["key-secret"] = self.secret()
                options["encrypt"] = enc
            if self.maybe(0.3):
                options["cluster-size"] = r.choice([65536, 512, 1000, 1 << 21])
            if self.maybe(0.2):
                options["version"] = r.choice(["v2", "v3"])
        job = self.job_id()
        return Step(cmd("blockdev-create", {"job-id": job, "options": options}), job=job)

    def reopen(self) -> Step:
        node = self.r.choice(list(NODES))
        driver = NODES[node][0]
        o: dict[str, Any] = {"driver": driver, "node-name": node, "file": f"f{node}"}
        if self.maybe(0.7):
            o["read-only"] = self.maybe()
        key = self.r.choice(["s0", "s0", "s0", None, "s1"])
        if node == "q0":
            self.q0_read_only = bool(o.get("read-only"))
        if driver == "luks":
            if key is not None:
                o["key-secret"] = key
        elif key is not None:
            o["encrypt"] = {"format": "luks", "key-secret": key}
        return Step(cmd("blockdev-reopen", {"options": [o]}))

    def job_verb(self) -> Step:
        verb = self.r.choice(["query-jobs", "job-dismiss", "job-dismiss", "job-cancel"])
        if verb == "query-jobs":
            return Step(cmd("query-jobs"))
        target = f"j{self.r.randrange(self.jobs + 1)}"
        return Step(cmd(verb, {"id": target}))

    def step(self) -> Step:
        k = self.r.choices(["amend", "create", "reopen", "job", "query"],
                           weights=[40, 20, 12, 20, 8])[0]
        if k == "amend":
            return self.amend()
        if k == "create":
            return self.create()
        if k == "reopen":
            return self.reopen()
        if k == "job":
            return self.job_verb()
        return Step(cmd("query-named-block-nodes", {"flat": True}))


def generate(seed: int, length: int = 14) -> list[Step]:
    g = Generator(seed)
    body = [g.step() for _ in range(length)]
    tail = [Step(cmd("query-jobs")), Step(cmd("query-named-block-nodes", {"flat": True}))]
    return prologue() + body + tail


# --------------------------------------------------------------------------
# Running


def start_qmpd(sock: str, args: list[str], tmp: str) -> subprocess.Popen:
    log = open(os.path.join(tmp, "qmpd.log"), "wb")
    with log:
        proc = subprocess.Popen([sys.executable, "-m", "qmpd", "--socket", sock, *args],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 15
    while not accepts(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError("qmpd did not start: "
                               + open(os.path.join(tmp, "qmpd.log")).read())
        time.sleep(0.02)
    return proc


#: qsd's PBKDF2 calibration fails now and then on a busy machine (QEMU 7.2's
#: qcrypto_pbkdf2_count_iters); such a qsd run is repeated, not compared.
QSD_FLAKE = "Unable to get accurate CPU usage"


def ended_job_errors(wire: "Wire", msgs: list, settle: float) -> list:
    """The errors of jobs that a step saw abort, asked with a side query-jobs.

    A job's error is only in query-jobs, which a sequence may never send: to
    tell qsd's calibration flake from a real divergence the harness asks
    itself (query-jobs changes nothing) and keeps the answer apart from the
    compared replies.
    """
    if not any(is_event(m) and m.get("event") == "JOB_STATUS_CHANGE"
               and m["data"]["status"] == "aborting" for m in msgs):
        return []
    wire.send(json.dumps(cmd("query-jobs")).encode())
    reply = wire.read(1, [], settle=settle)
    msgs.extend(m for m in reply if is_event(m))    # they belong to the step
    return [{"id": j["id"], "error": j["error"]} for m in reply
            if isinstance(m, dict) and "return" in m for j in m["return"] if j.get("error")]


def run_side(which: str, steps: list[Step], pristine: str, settle: float,
             attempts: int = 2) -> dict:
    for _ in range(attempts):
        got = run_side_once(which, steps, pristine, settle)
        if QSD_FLAKE not in json.dumps([got["steps"], got["job_errors"]]):
            return got
    return got


def run_side_once(which: str, steps: list[Step], pristine: str, settle: float) -> dict:
    tmp = tempfile.mkdtemp(prefix=f"diff-{which}-")
    try:
        for name in os.listdir(pristine):
            shutil.copyfile(os.path.join(pristine, name), os.path.join(tmp, name))
        sock = os.path.join(tmp, "qmp.sock")
        start = start_qsd if which == "qsd" else start_qmpd
        proc = start(sock, SECRET_ARGS, tmp)
        try:
            wire = Wire(sock)
            try:
                wire.read(1, [], settle=settle, deadline=5)
                wire.send(json.dumps(cmd("qmp_capabilities")).encode())
                wire.read(1, [], settle=settle)
                out = []
                job_errors: list[list] = []
                for step in steps:
                    if wire.eof:
                        out.append([{"eof": True}])
                        job_errors.append([])
                        continue
                    text = json.dumps(step.msg).replace("{tmp}", tmp)
                    wire.send(text.encode())
                    out.append(wire.read(1, step.until(), settle=settle))
                    job_errors.append(ended_job_errors(wire, out[-1], settle))
            finally:
                wire.close()
        finally:
            stop(proc)
        norm = Normaliser(tmp)
        return {"steps": [norm.value(m) for m in out], "unlock": unlock_state(tmp),
                "job_errors": job_errors}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------
# Comparing


LOCK_TEXTS = ("lock", "in use", "is busy")


def drop_shutdown(msgs: list) -> list:
    return [m for m in msgs if not (is_event(m) and m.get("event") == "SHUTDOWN")]


def is_file_open_failure(step: Step, msgs: list) -> bool:
    """A blockdev-create whose job failed to create/open its file (README)."""
    if step.msg["execute"] != "blockdev-create":
        return False
    return any(is_event(m) and m.get("event") == "JOB_STATUS_CHANGE" for m in msgs) and \
        step.msg["arguments"]["options"].get("driver") == "file" and \
        "nodir/" in step.msg["arguments"]["options"].get("filename", "")


def lock_refusal(msgs: list) -> bool:
    """qsd refused an amend because an undismissed amend job still holds the node."""
    for m in msgs:
        if isinstance(m, dict) and "error" in m and any(
                t in m["error"].get("desc", "") for t in LOCK_TEXTS):
            return True
    return False


def undismissed_amend(steps: list[Step], upto: int, node: str,
                      qsd_steps: list) -> bool:
    """Whether an earlier amend on ``node`` started a job not dismissed before ``upto``."""
    open_jobs: set[str] = set()
    for i in range(upto):
        msg = steps[i].msg
        replies = [m for m in qsd_steps[i] if not is_event(m)]
        ok = bool(replies) and "return" in replies[0]
        if msg["execute"] == "x-blockdev-amend" and ok and \
                msg["arguments"]["node-name"] == node:
            open_jobs.add(msg["arguments"]["job-id"])
        elif msg["execute"] == "job-dismiss" and ok:
            open_jobs.discard(msg["arguments"]["id"])
    return bool(open_jobs)


def step_node(step: Step) -> str | None:
    a = step.msg.get("arguments", {})
    if step.msg["execute"] == "x-blockdev-amend":
        return a.get("node-name")
    if step.msg["execute"] == "blockdev-reopen":
        return a["options"][0].get("node-name")
    return None


@dataclass
class Outcome:
    divergences: list[str] = field(default_factory=list)
    folded: list[str] = field(default_factory=list)
    qsd_crashes: list[str] = field(default_factory=list)


def creates_unimplemented_cipher(step: Step) -> bool:
    """blockdev-create of a LUKS volume with a cipher README lists as not
    implemented (no Serpent, Twofish or CAST5-CTR in `cryptography`): where
    qsd creates it and qmpd refuses, the states part from here on."""
    if step.msg.get("execute") != "blockdev-create":
        return False
    options = step.msg.get("arguments", {}).get("options", {})
    luks = options.get("encrypt", options) if options.get("driver") == "qcow2" else options
    alg, mode = luks.get("cipher-alg", "aes-256"), luks.get("cipher-mode", "xts")
    return alg.startswith(("serpent", "twofish")) or (alg == "cast5-128" and mode == "ctr")


def failed_qcow2_create_target(step: Step, job_errors: list) -> str | None:
    """The file node of a qcow2 blockdev-create whose job failed in qsd.

    QEMU writes an unencrypted qcow2 before it looks at the encryption
    options and leaves it when they fail; qmpd checks first and leaves the
    file empty (README, Known differences). From then on that image differs.
    """
    msg = step.msg
    if msg.get("execute") != "blockdev-create":
        return None
    args = msg.get("arguments", {})
    options = args.get("options", {})
    if options.get("driver") != "qcow2" or not isinstance(options.get("file"), str):
        return None
    if any(e["id"] == args.get("job-id") for e in job_errors):
        return options["file"]
    return None


def compare_runs(steps: list[Step], qsd: dict, qmpd: dict) -> Outcome:
    out = Outcome()
    eof = [{"eof": True}]
    partial: list[str] = []     # file nodes qsd left a partial qcow2 on
    unimplemented = False       # a create with a cipher qmpd lacks has run
    for i, step in enumerate(steps):
        want = drop_shutdown(qsd["steps"][i])
        have = drop_shutdown(qmpd["steps"][i])
        target = failed_qcow2_create_target(step, qsd["job_errors"][i])
        if target:
            partial.append(target)
        unimplemented = unimplemented or creates_unimplemented_cipher(step)
        if want == have:
            continue
        if partial and json.dumps(want) != json.dumps(have) and \
                step.msg["execute"] in ("query-named-block-nodes", "query-block"):
            out.folded.append(f"step {i}: qsd left a partial qcow2 on {partial} after a "
                              f"failed create (README); stopped comparing")
            return out
        if QSD_FLAKE in json.dumps([qsd["steps"][i:], qsd["job_errors"][i:]]):
            # A job that failed this way shows only 'aborting' here and its
            # error in a later query-jobs: anything from here on may follow.
            out.folded.append(f"step {i}: qsd's PBKDF2 calibration failed ({QSD_FLAKE}) "
                              f"here or in a job it started; stopped comparing")
            return out
        if want == eof or (i + 1 < len(steps) and qsd["steps"][i + 1] == eof):
            out.qsd_crashes.append(f"step {i}: qsd exited on {json.dumps(step.msg)}; "
                                   f"qmpd answered {json.dumps(have)[:600]}")
            return out
        node = step_node(step)
        if node and lock_refusal(want) and undismissed_amend(steps, i, node, qsd["steps"]):
            out.folded.append(f"step {i}: amend lock held until job-dismiss in qsd "
                              f"(README); stopped comparing")
            return out      # state differs from here on: nothing more to compare
        if unimplemented:
            # qsd goes on to its later checks (or creates); qmpd stops at the
            # cipher: the job's error or the image differs from here on.
            out.folded.append(f"step {i}: after a create with a cipher qmpd does not "
                              f"implement (README); stopped comparing")
            return out
        if is_file_open_failure(step, want) and \
                sorted(map(json.dumps, want)) == sorted(map(json.dumps, have)):
            out.folded.append(f"step {i}: file-open failure event order (README)")
            continue
        out.divergences.append(
            f"step {i}: {json.dumps(step.msg)}\n  qsd:  {json.dumps(want)[:1500]}"
            f"\n  qmpd: {json.dumps(have)[:1500]}")
    def unlock_state(side: dict) -> dict:
        return {k: v for k, v in side["unlock"].items()
                if k.removesuffix(".img") not in partial}

    if unlock_state(qsd) != unlock_state(qmpd):
        out.divergences.append(f"unlock state:\n  qsd:  {qsd['unlock']}\n"
                               f"  qmpd: {qmpd['unlock']}")
    return out


def run_sequence(seed: int, pristine: str, settle: float = 0.1,
                 length: int = 14) -> tuple[list[Step], Outcome]:
    steps = generate(seed, length)
    t0 = time.monotonic()
    qsd = run_side("qsd", steps, pristine, settle)
    t1 = time.monotonic()
    qmpd = run_side("qmpd", steps, pristine, settle)
    if os.environ.get("DIFF_TIMING"):
        print(f"seed {seed}: qsd {t1 - t0:.1f} s, qmpd {time.monotonic() - t1:.1f} s",
              file=sys.stderr)
    return steps, compare_runs(steps, qsd, qmpd)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--count", type=int, default=5)
    p.add_argument("--length", type=int, default=14)
    a = p.parse_args(argv)
    pristine = tempfile.mkdtemp(prefix="diff-img-")
    bad = 0
    try:
        make_images(pristine)
        for seed in range(a.seed, a.seed + a.count):
            _steps, outcome = run_sequence(seed, pristine, length=a.length)
            for c in outcome.qsd_crashes:
                print(f"seed {seed}: qsd crashed: {c}")
            for f in outcome.folded:
                print(f"seed {seed}: folded: {f}")
            for d in outcome.divergences:
                print(f"seed {seed}: DIVERGENCE {d}")
            bad += bool(outcome.divergences)
    finally:
        shutil.rmtree(pristine, ignore_errors=True)
    print(f"{a.count} sequences, {bad} with divergences")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
