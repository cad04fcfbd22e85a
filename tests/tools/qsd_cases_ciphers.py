"""Recorded cases for blockdev-create luks ciphers and amend's driver checks.

The group ``ciphers`` of tests/tools/record_qsd.py (see its theory of
operation), replayed against qmpd by tests/integration/test_qsd_reference.py.

- ``cipher-<alg>``: one case per cipher-alg; blockdev-create luks on an empty
  file node for every cipher-mode x ivgen-alg (and, with essiv, several
  ivgen-hash-alg), each a job of its own, then query-jobs shows every job's
  error text (QEMU's crypto/cipher.c and crypto/block-luks.c order of checks).
- ``amend-driver-*``: x-blockdev-amend and blockdev-amend whose
  ``options.driver`` does not match the node, and members of another
  driver's branch.

The module imports the recorder lazily (record_qsd imports this module).
"""

from __future__ import annotations

import json
from typing import Any

CIPHER_ALGS = ["aes-128", "aes-192", "aes-256", "des", "3des", "cast5-128",
               "serpent-128", "serpent-192", "serpent-256",
               "twofish-128", "twofish-192", "twofish-256"]
CIPHER_MODES = ["ecb", "cbc", "xts", "ctr"]
IVGENS = ["plain", "plain64", "essiv"]
ESSIV_HASHES = ["sha1", "sha512", "md5"]


def cmd(name: str, args: Any = None) -> str:
    msg: dict[str, Any] = {"execute": name}
    if args is not None:
        msg["arguments"] = args
    return json.dumps(msg)


def cipher_cases() -> list:
    from tests.tools.record_qsd import C, LUKS_IMG, QCOW_IMG, SECRETS, S, job_event, luks_node

    def create(job: str, **opts: Any):
        options = {"driver": "luks", "file": "f0", "size": 0, "key-secret": "s0",
                   "iter-time": 10, **opts}
        return S(cmd("blockdev-create", {"job-id": job, "options": options}), 1,
                 [job_event(job, "concluded")])

    file_node = cmd("blockdev-add", {"driver": "file", "node-name": "f0",
                                     "filename": "{tmp}/c.img"})
    common = {"files": [{"path": "{tmp}/c.img", "text": ""}], "daemon_args": SECRETS}
    cases = []
    for alg in CIPHER_ALGS:
        steps = []
        n = 0
        for mode in CIPHER_MODES:
            for ivgen in IVGENS:
                steps.append(create(f"j{n}", **{"cipher-alg": alg, "cipher-mode": mode,
                                                "ivgen-alg": ivgen}))
                n += 1
        for h in ESSIV_HASHES:
            steps.append(create(f"j{n}", **{"cipher-alg": alg, "cipher-mode": "cbc",
                                            "ivgen-alg": "essiv", "ivgen-hash-alg": h}))
            n += 1
        steps.append(create(f"j{n}", **{"cipher-alg": alg, "cipher-mode": "cbc",
                                        "ivgen-alg": "plain64", "ivgen-hash-alg": "sha1"}))
        cases.append(C(f"cipher-{alg}", file_node, *steps, cmd("query-jobs"), **common))

    def amend_steps(command: str, node: str, options: dict) -> list:
        return [S(cmd(command, {"job-id": "a0", "node-name": node, "options": options}),
                  1, [job_event("a0", "concluded")]), cmd("query-jobs")]

    luks_add = {"state": "active", "new-secret": "s1", "iter-time": 10}
    qcow2_node = cmd("blockdev-add", {"driver": "qcow2", "node-name": "q0",
                                      "encrypt": {"format": "luks", "key-secret": "s0"},
                                      "file": {"driver": "file",
                                               "filename": "{tmp}/q.qcow2"}})
    for command in ("x-blockdev-amend", "blockdev-amend"):
        short = "x" if command.startswith("x-") else "plain"
        luks = {"images": [LUKS_IMG], "daemon_args": SECRETS}
        qcow = {"images": [QCOW_IMG], "daemon_args": SECRETS}
        cases += [
            C(f"amend-driver-{short}-raw-on-luks", luks_node(),
              *amend_steps(command, "l0", {"driver": "raw"}), **luks),
            C(f"amend-driver-{short}-qcow2-on-luks", luks_node(),
              *amend_steps(command, "l0", {"driver": "qcow2",
                                           "encrypt": {"format": "luks", **luks_add}}), **luks),
            C(f"amend-driver-{short}-luks-on-qcow2", qcow2_node,
              *amend_steps(command, "q0", {"driver": "luks", **luks_add}), **qcow),
            C(f"amend-driver-{short}-luks-with-qcow2-member", luks_node(),
              *amend_steps(command, "l0", {"driver": "luks", "encrypt": {}, **luks_add}),
              **luks),
            C(f"amend-driver-{short}-qcow2-with-luks-member", qcow2_node,
              *amend_steps(command, "q0", {"driver": "qcow2", "new-secret": "s1",
                                           "encrypt": {"format": "luks", **luks_add}}), **qcow),
            C(f"amend-driver-{short}-file-node", luks_node(),
              *amend_steps(command, "l0", {"driver": "file"}), **luks),
        ]
    return cases
