"""The secrets and block groups of the recorded qsd cases.

Built with tests/tools/qsd_transcript.py; recorded by tests/tools/record_qsd.py.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tests.tools.qsd_transcript import (
    LUKS_IMG, QCOW_IMG, SECRET_IV, SECRET_KEY, SECRETS, C, Case, S, Step, b64, cmd,
    encrypt_secret, job_event, luks_node, secret_add,
)


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
        C("amend-after-erasing-every-slot", luks_node(),
          run_job(amend("j0", "l0", erase(keyslot=0), force=True), "j0"), dismiss("j0"),
          run_job(amend("j1", "l0", add_key()), "j1"), cmd("query-jobs"), dismiss("j1"),
          run_job(amend("j2", "l0", erase(**{"old-secret": "s0"})), "j2"), cmd("query-jobs"),
          **img),
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
