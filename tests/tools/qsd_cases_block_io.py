"""Recorded cases for the data-path verbs: block_resize, sizes, raw, blockdev-create.

The group ``block-io`` of tests/tools/record_qsd.py (see its theory of
operation): each case is played against qemu-storage-daemon 7.2 by the
recorder and against qmpd by tests/integration/test_qsd_reference.py.

- ``size-*``: what query-named-block-nodes reports for files whose size is
  not a multiple of 512 (QEMU counts sectors: 593921 bytes -> 594432).
- ``resize-*``: block_resize on file, luks, qcow2 (plain and with LUKS) and
  raw nodes: growing, shrinking, sizes the driver refuses, QEMU's order of
  checks (lookup, negative size, permissions, bdrv_check_request's limit,
  read-only, then the driver), and the permission conflict with a parent
  that does not share RESIZE.
- ``raw-*``: opening the raw format driver with ``offset`` and ``size``.
- ``create-*``: blockdev-create with an inline ``file`` definition for luks
  and qcow2, and sizes that QEMU refuses with its own texts.
- ``create-file-prealloc-*``: file creation with every preallocation mode
  and sizes -1 (QAPI's uint64 wraps to an off_t of -1), 0 and 64 KiB:
  file-posix refuses a preallocating "shrink" first, then "metadata".
- ``reopen-child-*``: blockdev-reopen of a qcow2 node whose file child it
  created, the child given again by its name or inline, with and without
  an explicit read-only: a child given by name inherits only a read-only
  the options state, else keeps its own (QEMU's keep_old_opts), so going
  back to read-write without saying so fails "Block node is read-only".

Every size here is refused (or accepted) whatever the file system: none
depends on a file system's largest file, so the replay may run anywhere.

"""

from __future__ import annotations

import json
from typing import Any

from tests.tools.qsd_transcript import LUKS_IMG, QCOW_IMG, SECRETS, C, S, job_event

INT64_MAX = (1 << 63) - 1
UINT64_MAX = (1 << 64) - 1
#: QEMU's BDRV_MAX_LENGTH: INT64_MAX aligned down to the 1 GiB request limit.
BDRV_MAX_LENGTH = 9223372035781033984
MiB = 1 << 20


def cmd(name: str, args: Any = None) -> str:
    msg: dict[str, Any] = {"execute": name}
    if args is not None:
        msg["arguments"] = args
    return json.dumps(msg)


def block_io_cases() -> list:

    def run_job(send: str, job: str):
        return S(send, 1, [job_event(job, "concluded")])

    def dismiss(job: str):
        return S(cmd("job-dismiss", {"id": job}), 1, [job_event(job, "null")])

    def create(job: str, options: dict) -> list:
        """A blockdev-create job run to its end, looked at and dismissed."""
        return [run_job(cmd("blockdev-create", {"job-id": job, "options": options}), job),
                cmd("query-jobs"), dismiss(job)]

    def new_file(path: str, size: int, job: str = "c0") -> list:
        return create(job, {"driver": "file", "filename": path, "size": size})

    def add_file(name: str = "f0", path: str = "{tmp}/f.img", **extra: Any) -> str:
        return cmd("blockdev-add", {"driver": "file", "node-name": name, "filename": path,
                                    **extra})

    def add_luks(name: str = "l0", file: Any = None, **extra: Any) -> str:
        file = file if file is not None else {"driver": "file", "filename": "{tmp}/a.img"}
        return cmd("blockdev-add", {"driver": "luks", "node-name": name, "key-secret": "s0",
                                    "file": file, **extra})

    def add_qcow2(name: str = "q0", file: Any = None, encrypted: bool = False,
                  **extra: Any) -> str:
        file = file if file is not None else {"driver": "file", "filename": "{tmp}/p.qcow2"}
        opts: dict[str, Any] = {"driver": "qcow2", "node-name": name, "file": file, **extra}
        if encrypted:
            opts["encrypt"] = {"format": "luks", "key-secret": "s0"}
        return cmd("blockdev-add", opts)

    def add_raw(name: str = "r0", file: Any = "f0", **extra: Any) -> str:
        return cmd("blockdev-add", {"driver": "raw", "node-name": name, "file": file, **extra})

    def resize(node: str | None, size: int, device: str | None = None) -> str:
        args: dict[str, Any] = {"size": size}
        if node is not None:
            args["node-name"] = node
        if device is not None:
            args["device"] = device
        return cmd("block_resize", args)

    qnodes = cmd("query-named-block-nodes", {"flat": True})
    plain_qcow2 = {"path": "{tmp}/p.qcow2", "format": "qcow2", "size": "16M"}
    luks = {"images": [LUKS_IMG], "daemon_args": SECRETS}
    qcow2 = {"images": [plain_qcow2]}
    qcow2_luks = {"images": [QCOW_IMG], "daemon_args": SECRETS}
    odd = new_file("{tmp}/f.img", 593921)

    cases = [
        # -- sizes ---------------------------------------------------------------------
        C("size-file-not-sector-multiple", *odd, add_file(), qnodes),
        C("size-luks-over-odd-file", *odd, add_file(), resize("f0", 2 * MiB + 1234),
          cmd("blockdev-del", {"node-name": "f0"}), add_luks(), resize("l0", 1000000 + 17),
          qnodes, **luks),
        # -- block_resize: the checks before any driver --------------------------------
        C("resize-unknown-node", resize("nope", MiB)),
        C("resize-checks", *odd, add_file(), resize(None, MiB, device="f0"),
          resize("f0", -1), resize("nope", -1), resize("f0", INT64_MAX),
          resize("f0", BDRV_MAX_LENGTH + 512), qnodes, resize("f0", MiB, device="nope"),
          qnodes, resize("f0", 0), qnodes),
        C("resize-read-only-file", *odd, add_file(**{"read-only": True}), resize("f0", MiB),
          resize("f0", INT64_MAX), qnodes),
        C("resize-read-only-luks", add_luks(**{"read-only": True}), resize("l0", 32 * MiB),
          qnodes, **luks),
        # -- file ------------------------------------------------------------------------
        C("resize-file-grow-and-shrink", *odd, add_file(), resize("f0", 3 * MiB), qnodes,
          resize("f0", 1000), qnodes, resize("f0", 4 * MiB + 1), qnodes),
        C("resize-file-under-qcow2", add_file(path="{tmp}/p.qcow2"), add_qcow2(file="f0"),
          resize("f0", 32 * MiB), resize("q0", 32 * MiB), qnodes, **qcow2),
        C("resize-file-under-luks", add_file(path="{tmp}/a.img"), add_luks(file="f0"),
          resize("f0", 32 * MiB), qnodes, **luks),
        C("resize-file-under-raw", *odd, add_file(), add_raw(), resize("f0", 2 * MiB),
          qnodes, resize("r0", 3 * MiB), qnodes),
        C("resize-file-under-raw-window", *odd, add_file(), add_raw(offset=4096),
          resize("f0", 2 * MiB), add_raw("r1", size=65536), resize("f0", 2 * MiB),
          cmd("blockdev-del", {"node-name": "r1"}), resize("f0", 2 * MiB), qnodes),
        # -- luks --------------------------------------------------------------------------
        C("resize-luks-grow-shrink-odd", add_luks(), resize("l0", 32 * MiB), qnodes,
          resize("l0", 8 * MiB), qnodes, resize("l0", 8 * MiB + 100), qnodes, **luks),
        C("resize-luks-huge", add_luks(), resize("l0", INT64_MAX),
          resize("l0", BDRV_MAX_LENGTH), resize("l0", BDRV_MAX_LENGTH - MiB),
          qnodes, **luks),
        # -- qcow2 -------------------------------------------------------------------------
        C("resize-qcow2-grow", add_qcow2(), resize("q0", 32 * MiB + 1), resize("q0", 1000),
          resize("q0", 1 << 52), resize("q0", (1 << 51) + 512), resize("q0", 1 << 62),
          resize("q0", INT64_MAX), qnodes, resize("q0", 64 * MiB), qnodes,
          resize("q0", 2 << 30), qnodes, **qcow2),
        C("resize-qcow2-shrink", add_qcow2(), resize("q0", 4 * MiB), qnodes,
          resize("q0", 0), qnodes, resize("q0", 16 * MiB), qnodes, **qcow2),
        C("resize-qcow2-luks-grow", add_qcow2(file={"driver": "file",
                                                    "filename": "{tmp}/q.qcow2"},
                                              encrypted=True),
          resize("q0", 40 * MiB), qnodes, **qcow2_luks),
        C("resize-qcow2-read-only", add_qcow2(**{"read-only": True}), resize("q0", 64 * MiB),
          resize("q0", 64 * MiB + 1), **qcow2),
        # -- raw ---------------------------------------------------------------------------
        C("raw-over-file", *odd, add_file(), add_raw(), qnodes, resize("r0", 2 * MiB),
          qnodes),
        C("raw-window", *odd, add_file(), add_raw(offset=512, size=65536), qnodes,
          resize("r0", 131072)),
        C("raw-window-offset-only", *odd, add_file(), add_raw(offset=4096), qnodes,
          resize("r0", INT64_MAX), resize("r0", INT64_MAX - 4095), resize("r0", 65536),
          qnodes),
        C("raw-window-errors", *odd, add_file(), add_raw(offset=600000),
          add_raw(size=600000), add_raw(size=1000), add_raw(offset=1, size=594432),
          add_raw(offset=512, size=594432), add_raw(offset=-1), add_raw(size=-512),
          add_raw(offset=594432), add_raw("r1", offset=0), qnodes),
        # -- blockdev-create: inline files and huge sizes --------------------------------
        C("create-luks-inline-file", *new_file("{tmp}/n.img", 0),
          *create("c1", {"driver": "luks", "size": 4 * MiB, "key-secret": "s0",
                         "iter-time": 10,
                         "file": {"driver": "file", "filename": "{tmp}/n.img"}}),
          qnodes, add_luks(file={"driver": "file", "filename": "{tmp}/n.img"}), qnodes,
          daemon_args=SECRETS),
        C("create-luks-inline-file-missing",
          *create("c1", {"driver": "luks", "size": 4 * MiB, "key-secret": "s0",
                         "iter-time": 10,
                         "file": {"driver": "file", "filename": "{tmp}/nope.img"}}),
          qnodes, daemon_args=SECRETS),
        C("create-qcow2-inline-file", *new_file("{tmp}/n.qcow2", 0),
          *create("c1", {"driver": "qcow2", "size": 4 * MiB, "cluster-size": 4096,
                         "file": {"driver": "file", "filename": "{tmp}/n.qcow2"}}),
          qnodes, add_qcow2(file={"driver": "file", "filename": "{tmp}/n.qcow2"}), qnodes),
        C("create-qcow2-luks-inline-file", *new_file("{tmp}/n.qcow2", 0),
          *create("c1", {"driver": "qcow2", "size": 4 * MiB,
                         "encrypt": {"format": "luks", "key-secret": "s0", "iter-time": 10},
                         "file": {"driver": "file", "filename": "{tmp}/n.qcow2"}}),
          add_qcow2(file={"driver": "file", "filename": "{tmp}/n.qcow2"}, encrypted=True),
          qnodes, daemon_args=SECRETS),
        C("create-luks-huge", *new_file("{tmp}/n.img", 0), add_file(path="{tmp}/n.img"),
          *create("c1", {"driver": "luks", "file": "f0", "size": INT64_MAX,
                         "key-secret": "s0", "iter-time": 10}),
          *create("c2", {"driver": "luks", "file": "f0", "size": UINT64_MAX,
                         "key-secret": "s0", "iter-time": 10}),
          *create("c3", {"driver": "luks", "file": "f0", "size": BDRV_MAX_LENGTH,
                         "key-secret": "s0", "iter-time": 10}),
          *create("c4", {"driver": "luks", "file": "f0", "size": INT64_MAX - 1024 * 1024,
                         "key-secret": "s0", "iter-time": 10}),
          qnodes, daemon_args=SECRETS),
        C("create-qcow2-huge", *new_file("{tmp}/n.qcow2", 0), add_file(path="{tmp}/n.qcow2"),
          *create("c1", {"driver": "qcow2", "file": "f0", "size": 1 << 62}),
          *create("c2", {"driver": "qcow2", "file": "f0", "size": (1 << 51) + 65536}),
          *create("c3", {"driver": "qcow2", "file": "f0", "size": INT64_MAX - 511}),
          *create("c4", {"driver": "qcow2", "file": "f0", "size": BDRV_MAX_LENGTH + 512}),
          *create("c5", {"driver": "qcow2", "file": "f0", "size": UINT64_MAX - 511}),
          *create("c6", {"driver": "qcow2", "file": "f0", "size": 1 << 62,
                         "cluster-size": 2 * MiB}),
          *create("c7", {"driver": "qcow2", "file": "f0", "size": 1 << 62,
                         "cluster-size": 512}),
          *create("c8", {"driver": "qcow2", "file": "f0", "size": (1 << 62) + 1})),
        C("create-qcow2-luks-huge", *new_file("{tmp}/n.qcow2", 0),
          add_file(path="{tmp}/n.qcow2"),
          *create("c1", {"driver": "qcow2", "file": "f0", "size": 1 << 62,
                         "encrypt": {"format": "luks", "key-secret": "s0",
                                     "iter-time": 10}}),
          *create("c2", {"driver": "qcow2", "file": "f0", "size": 1 << 62,
                         "encrypt": {"format": "luks", "key-secret": "nope"}}),
          *create("c3", {"driver": "qcow2", "file": "f0", "size": 4 * MiB,
                         "encrypt": {"format": "luks"}}),
          *create("c4", {"driver": "qcow2", "file": "f0", "size": 4 * MiB,
                         "encrypt": {"format": "luks", "key-secret": "nope"}}),
          daemon_args=SECRETS),
        C("create-file-huge",
          *create("c1", {"driver": "file", "filename": "{tmp}/n.img", "size": UINT64_MAX}),
          *create("c2", {"driver": "file", "filename": "{tmp}/n.img", "size": 1 << 63}),
          cmd("blockdev-add", {"driver": "file", "node-name": "f0",
                               "filename": "{tmp}/n.img"}), qnodes),
        # -- blockdev-create driver=file: preallocation modes and sizes ------------------
        *[C(f"create-file-prealloc-{mode}-size-{label}",
            *create(f"c-{mode}-{label}", {"driver": "file", "filename": "{tmp}/pre.img",
                                          "size": size, "preallocation": mode}), qnodes)
          for mode in ("off", "metadata", "falloc", "full")
          for label, size in (("minus-1", -1), ("0", 0), ("64k", 65536))],
        # -- blockdev-reopen: a child given by its name keeps its own read-only -------
        *reopen_child_cases(add_qcow2, qnodes, qcow2),
    ]
    return cases


def reopen_child_cases(add_qcow2: Any, qnodes: str, images: dict) -> list:
    """Reopen a qcow2 node over the file child it created (see the module doc)."""
    inline = {"driver": "file", "node-name": "fq0", "filename": "{tmp}/p.qcow2"}

    def reopen(node: dict) -> str:
        return cmd("blockdev-reopen", {"options": [node]})

    def qcow2(read_only: bool | None = None, file: Any = "fq0") -> str:
        node: dict[str, Any] = {"driver": "qcow2", "node-name": "q0", "file": file}
        if read_only is not None:
            node["read-only"] = read_only
        return reopen(node)

    def file(read_only: bool) -> str:
        return reopen({**inline, "read-only": read_only})

    add = add_qcow2(file=inline)
    return [
        C("reopen-child-by-name-back-to-rw-implicit", add, qcow2(True), qnodes, qcow2(),
          qnodes, **images),
        C("reopen-child-by-name-back-to-rw-explicit", add, qcow2(True), qcow2(True),
          qcow2(False), qnodes, **images),
        C("reopen-child-inline-then-by-name", add, qcow2(True, inline), qcow2(), qnodes,
          **images),
        C("reopen-child-by-name-then-inline", add, qcow2(True), qcow2(file=inline), qnodes,
          **images),
        C("reopen-child-made-rw-on-its-own", add, qcow2(True), file(False), qnodes, qcow2(),
          qnodes, **images),
        C("reopen-child-ro-under-rw-parent", add, file(True), qcow2(), qcow2(True), qcow2(),
          qnodes, **images),
    ]
