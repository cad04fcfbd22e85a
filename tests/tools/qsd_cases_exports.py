"""The "exports" group of tests/tools/record_qsd.py: the NBD server and block exports.

qsd 7.2's answers to nbd-server-start/-stop, block-export-add/-del,
query-block-exports, the legacy nbd-server-add/-remove and the permission
checks of an export's node (blockdev-del, block_resize, a second format
node). Every case makes its own images (so it gets a fresh daemon: an NBD
server is daemon state). What needs a connected NBD client (safe delete
refused, a hard delete's late event) or a port taken by another process
cannot be said over QMP alone: tests/integration/test_export_qmp_live.py
plays those against both daemons at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.tools.qsd_transcript import C, Case, S, Step, cmd, job_event

RAW_IMG = {"path": "{tmp}/a.img", "format": "raw", "size": "16M"}
QCOW_IMG = {"path": "{tmp}/q.qcow2", "format": "qcow2", "size": "16M"}
LUKS_IMG = {"path": "{tmp}/l.img", "format": "luks", "passphrase": "pass0"}

FILE_NODE = ["--blockdev", "driver=file,node-name=f0,filename={tmp}/a.img"]
NBD_UNIX = ["--nbd-server", "addr.type=unix,addr.path={tmp}/nbd.sock"]
SECRETS = ["--object", "secret,id=s0,data=pass0", "--object", "secret,id=s1,data=pass1"]

#: A raw image on a file node f0 and an NBD server on {tmp}/nbd.sock.
SERVED = {"images": [RAW_IMG], "daemon_args": FILE_NODE + NBD_UNIX}
#: The same image, no server yet.
IMAGE = {"images": [RAW_IMG], "daemon_args": FILE_NODE}


def deleted(export_id: str) -> dict:
    return {"event": "BLOCK_EXPORT_DELETED", "data": {"id": export_id}}


def start(addr_type: str, **data: Any) -> str:
    extra = {k: data.pop(k) for k in ("tls-creds", "tls-authz", "max-connections")
             if k in data}
    return cmd("nbd-server-start", {"addr": {"type": addr_type, "data": data}, **extra})


def start_unix(path: str = "{tmp}/n.sock", **extra: Any) -> str:
    return start("unix", path=path, **extra)


def export(export_id: str = "e0", node: str = "f0", **extra: Any) -> str:
    return cmd("block-export-add", {"type": "nbd", "id": export_id, "node-name": node, **extra})


def export_del(export_id: str = "e0", until: bool = True, **extra: Any) -> Step:
    return S(cmd("block-export-del", {"id": export_id, **extra}), 1,
             [deleted(export_id)] if until else [])


def stop(*export_ids: str) -> Step:
    return S(cmd("nbd-server-stop"), 1, [deleted(e) for e in export_ids])


QUERY = cmd("query-block-exports")


def server_cases() -> list[Case]:
    return [
        C("server-stop-not-running", cmd("nbd-server-stop"), **IMAGE),
        C("server-start-unix", start_unix(), QUERY, cmd("nbd-server-stop"),
          cmd("nbd-server-stop"), start_unix(), cmd("nbd-server-stop"), **IMAGE),
        C("server-start-twice", start_unix(), start_unix("{tmp}/other.sock"),
          start("inet", host="127.0.0.1", port="0"), **IMAGE),
        C("server-start-after-cli-server", start_unix(), **SERVED),
        C("server-start-inet-any-port", start("inet", host="127.0.0.1", port="0"),
          cmd("nbd-server-stop"), **IMAGE),
        C("server-start-inet-options",
          start("inet", host="127.0.0.1", port="0", numeric=True, ipv4=True,
                **{"keep-alive": True}), **IMAGE),
        C("server-start-inet-bad-port", start("inet", host="127.0.0.1", port="nbd-nope"),
          **IMAGE),
        C("server-start-max-connections", start_unix(**{"max-connections": 1}),
          cmd("nbd-server-stop"), start_unix(**{"max-connections": 0}), **IMAGE),
        C("server-start-max-connections-negative", start_unix(**{"max-connections": -1}),
          **IMAGE),
        C("server-start-missing-directory", start_unix("{tmp}/no/such/dir/n.sock"), QUERY,
          start_unix(), **IMAGE),
        C("server-start-path-too-long", start_unix("{tmp}/" + "p" * 150), **IMAGE),
        C("server-start-path-is-directory", start_unix("{tmp}"), **IMAGE),
        C("server-start-path-over-existing-file", start_unix("{tmp}/old"),
          files=[{"path": "{tmp}/old", "text": "not a socket"}], **IMAGE),
        C("server-start-fd-by-name", start("fd", str="nope"), **IMAGE),
        C("server-start-fd-by-number", start("fd", str="0"), **IMAGE),
        C("server-start-vsock", start("vsock", cid="1", port="10809"), QUERY, **IMAGE),
        C("server-start-unix-abstract", start_unix("qmpd-test-abstract-nbd", abstract=True),
          cmd("nbd-server-stop"),
          start_unix("qmpd-test-abstract-nbd", abstract=True, tight=False), **IMAGE),
        C("server-start-abstract-too-long", start_unix("a" * 108, abstract=True), **IMAGE),
        C("server-start-inet-no-family", start("inet", host="127.0.0.1", port="0",
                                               ipv4=False, ipv6=False), **IMAGE),
        C("server-start-inet-wrong-family", start("inet", host="127.0.0.1", port="0",
                                                  ipv6=True), **IMAGE),
        C("server-start-inet-numeric-name", start("inet", host="localhost", port="0",
                                                  numeric=True), **IMAGE),
        C("server-start-inet-unassigned-address", start("inet", host="192.0.2.1", port="0",
                                                        numeric=True), **IMAGE),
        C("server-start-tls-creds-missing", start_unix(**{"tls-creds": "nope"}),
          start("inet", host="127.0.0.1", port="0", **{"tls-creds": "nope"}), **IMAGE),
        C("server-start-tls-creds-not-creds", start_unix(**{"tls-creds": "s0"}),
          images=[RAW_IMG], daemon_args=FILE_NODE + SECRETS),
        C("server-start-tls-authz-without-creds", start_unix(**{"tls-authz": "a0"}), QUERY,
          **IMAGE),
    ]


def export_cases() -> list[Case]:
    ro_node = cmd("blockdev-add", {"driver": "file", "node-name": "r0", "read-only": True,
                                   "filename": "{tmp}/a.img"})
    return [
        C("export-without-server", export(), QUERY, **IMAGE),
        C("export-defaults", export(), QUERY, **SERVED),
        C("export-over-qmp-server", start_unix(), export(), QUERY, **IMAGE),
        C("export-invalid-ids", export("1x"), export(""), export("a b"), export("e" * 200),
          QUERY, **SERVED),
        C("export-duplicate-id", export(), export(name="other"), QUERY, **SERVED),
        C("export-unknown-node", export(node="nope"), QUERY, **SERVED),
        C("export-unknown-node-no-server", export(node="nope"), **IMAGE),
        C("export-duplicate-name", export(), export("e1"), export("e1", name="other"),
          export("e2", name="other"), QUERY, **SERVED),
        C("export-name-too-long", export(name="n" * 4097), export(name="n" * 4096), QUERY,
          **SERVED),
        C("export-description-too-long", export(description="d" * 4097),
          export(description="d" * 4096), QUERY, **SERVED),
        C("export-name-checked-before-description",
          export(name="n" * 4097, description="d" * 4097), **SERVED),
        C("export-bitmap-missing", export(bitmaps=["b0"]),
          export(bitmaps=[{"node": "f0", "name": "b0"}]), export(bitmaps=[]), QUERY,
          **SERVED),
        C("export-iothread-missing", export(iothread="io0"),
          export(iothread="io0", **{"fixed-iothread": True}),
          export(**{"fixed-iothread": True}), QUERY, **SERVED),
        C("export-writable-read-only-node", ro_node, export(node="r0", writable=True),
          export(node="r0", writable=False), QUERY, **SERVED),
        C("export-all-options", export(name="disk", description="a disk", writable=True,
                                       writethrough=True, **{"allocation-depth": True}),
          QUERY, **SERVED),
        C("export-fuse-bad-mountpoint",
          cmd("block-export-add", {"type": "fuse", "id": "e1", "node-name": "f0",
                                   "mountpoint": "{tmp}/nope"}),
          cmd("block-export-add", {"type": "fuse", "id": "e1", "node-name": "f0",
                                   "mountpoint": "{tmp}"}),
          cmd("block-export-add", {"type": "fuse", "id": "1x", "node-name": "f0",
                                   "mountpoint": "{tmp}/nope"}),
          QUERY, **SERVED),
        C("export-vhost-user-blk",
          cmd("block-export-add", {"type": "vhost-user-blk", "id": "e2", "node-name": "f0",
                                   "addr": {"type": "unix", "path": "{tmp}/vhost.sock"}}),
          QUERY, difference={"note": "qmpd serves NBD only: vhost-user-blk is refused "
                                     "('qmpd does not offer vhost-user-blk exports')",
                             "skip": ["steps[0].replies", "steps[1].replies"]},
          **SERVED),
        C("export-luks-node", export(node="l0", name="disk", writable=True), QUERY,
          images=[LUKS_IMG],
          daemon_args=SECRETS + ["--blockdev", "driver=luks,node-name=l0,key-secret=s0,"
                                 "file.driver=file,file.filename={tmp}/l.img"] + NBD_UNIX),
        C("query-newest-first", export(), export("e1", name="b"), export("e2", name="c"), QUERY,
          export_del("e1"), QUERY, **SERVED),
        C("export-del-missing", cmd("block-export-del", {"id": "nope"}), **SERVED),
        C("export-del-without-server", cmd("block-export-del", {"id": "nope"}), **IMAGE),
        C("export-del-safe", export(), export_del(), QUERY, export_del(until=False), **SERVED),
        C("export-del-hard", export(), export_del(mode="hard"), QUERY, **SERVED),
        C("export-del-then-add-again", export(), export_del(), export(), QUERY, **SERVED),
        C("server-stop-with-exports", export(), export("e1", name="b", writable=True), stop("e0", "e1"),
          QUERY, export(), start_unix(), export(), QUERY, **SERVED),
        C("blockdev-del-exported-node", export(), cmd("blockdev-del", {"node-name": "f0"}),
          export_del(), cmd("blockdev-del", {"node-name": "f0"}), **SERVED),
        C("blockdev-del-exported-node-after-stop", export(), stop("e0"),
          cmd("blockdev-del", {"node-name": "f0"}), **SERVED),
    ]


def legacy_cases() -> list[Case]:
    ro_node = cmd("blockdev-add", {"driver": "file", "node-name": "r0", "read-only": True,
                                   "filename": "{tmp}/a.img"})

    def add(**args: Any) -> str:
        return cmd("nbd-server-add", args)

    def remove(name: str, until: bool = True, **extra: Any) -> Step:
        return S(cmd("nbd-server-remove", {"name": name, **extra}), 1,
                 [deleted(name)] if until else [])

    return [
        C("legacy-add-without-server", add(device="f0"), add(device="nope"), **IMAGE),
        C("legacy-add", add(device="f0"), QUERY, add(device="f0"),
          add(device="f0", name="disk", writable=True, description="d"), QUERY,
          remove("disk"), remove("f0", mode="hard"), QUERY, **SERVED),
        C("legacy-add-unknown-device", add(device="nope"), **SERVED),
        C("legacy-add-read-only-writable", ro_node, add(device="r0", writable=True), QUERY,
          **SERVED),
        C("legacy-add-bitmap-missing", add(device="f0", bitmap="b0"), QUERY, **SERVED),
        C("legacy-add-name-too-long", add(device="f0", name="n" * 4097),
          add(device="f0", description="d" * 4097), **SERVED),
        C("legacy-add-invalid-id", add(device="f0", name="1x"), QUERY, **SERVED),
        C("legacy-remove-missing", remove("nope", until=False), **SERVED),
        C("legacy-remove-without-server", remove("nope", until=False), **IMAGE),
        C("legacy-remove-block-export", export(), remove("e0"), QUERY, **SERVED),
    ]


def permission_cases() -> list[Case]:
    qcow_file = ["--blockdev", "driver=file,node-name=f0,filename={tmp}/q.qcow2"]
    qcow = {"images": [QCOW_IMG], "daemon_args": qcow_file + NBD_UNIX}
    qcow_node = cmd("blockdev-add", {"driver": "qcow2", "node-name": "q0", "file": "f0"})
    luks_node = ["--blockdev", "driver=luks,node-name=l0,key-secret=s0,"
                 "file.driver=file,file.filename={tmp}/l.img"]
    amend = {"job-id": "j0", "node-name": "l0",
             "options": {"driver": "luks", "state": "active", "new-secret": "s1",
                         "iter-time": 10}}
    return [
        C("perm-writable-export-under-format-node", qcow_node, export(writable=True),
          export(), QUERY, **qcow),
        C("perm-format-node-over-writable-export", export(writable=True), qcow_node,
          export_del(), qcow_node, **qcow),
        C("perm-format-node-over-read-only-export", export(), qcow_node, QUERY, **qcow),
        C("perm-resize-exported-node", qcow_node, export("e0", "q0", writable=True),
          cmd("block_resize", {"node-name": "q0", "size": 33554432}), export_del(),
          cmd("block_resize", {"node-name": "q0", "size": 33554432}), **qcow),
        C("perm-resize-read-only-export", export(),
          cmd("block_resize", {"node-name": "f0", "size": 33554432}), **SERVED),
        C("perm-amend-exported-luks-node", export("e0", "l0", writable=True),
          S(cmd("x-blockdev-amend", amend), 1, [job_event("j0", "concluded")]),
          cmd("query-jobs"), QUERY, images=[LUKS_IMG],
          daemon_args=SECRETS + luks_node + NBD_UNIX),
    ]


TLS_DIR = Path(__file__).resolve().parent.parent / "data" / "tls"


def tls_files(*names: str, garbage: tuple[str, ...] = ()) -> list[dict]:
    """The recorded test CA/server credentials written into {tmp} (QEMU's file names)."""
    files = [{"path": "{tmp}/" + n, "text": (TLS_DIR / n).read_text()} for n in names]
    return files + [{"path": "{tmp}/" + n, "text": "not a certificate\n"} for n in garbage]


def x509(creds_id: str = "t0", directory: str = "{tmp}", **props: Any) -> str:
    return cmd("object-add", {"qom-type": "tls-creds-x509", "id": creds_id, "dir": directory,
                              **props})


SERVER_FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem")
#: qmpd runs on Pythons without TLS-PSK (3.11/3.12) and has no anonymous TLS.
NO_PSK = {"note": "tls-creds-psk needs Python 3.13's ssl PSK support: qmpd refuses it with a "
                  "text naming why", "skip": ["steps[0].replies"]}
NO_ANON = {"note": "qmpd has no anonymous TLS (Python's ssl offers no anon key exchange): "
                   "tls-creds-anon is refused", "skip": ["steps[0].replies", "steps[1].replies"]}


def tls_cases() -> list[Case]:
    return [
        C("tls-x509-missing-dir", x509(directory="{tmp}/nope", endpoint="server"),
          x509(directory="{tmp}/nope"), **IMAGE),
        C("tls-x509-no-dir-property",
          cmd("object-add", {"qom-type": "tls-creds-x509", "id": "t0", "endpoint": "server"}),
          **IMAGE),
        C("tls-x509-server-files-missing", x509(endpoint="server"),
          files=tls_files("ca-cert.pem"), **IMAGE),
        C("tls-x509-server-key-missing", x509(endpoint="server"),
          files=tls_files("ca-cert.pem", "server-cert.pem"), **IMAGE),
        C("tls-x509-files-checked-before-parsing", x509(endpoint="server"),
          files=tls_files(garbage=("ca-cert.pem",)), **IMAGE),
        C("tls-x509-bad-ca", x509(endpoint="client"), files=tls_files(garbage=("ca-cert.pem",)),
          **IMAGE),
        C("tls-x509-loaded-not-writable", x509(endpoint="server", loaded=True),
          files=tls_files(*SERVER_FILES), **IMAGE),
        C("tls-x509-client-endpoint-refused-by-server", x509(endpoint="client"),
          start_unix(**{"tls-creds": "t0"}), QUERY, files=tls_files("ca-cert.pem"), **IMAGE),
        C("tls-x509-server", x509(endpoint="server"), x509("t1", endpoint="server",
                                                          **{"verify-peer": False}),
          x509("t0", endpoint="server"),
          start_unix(**{"tls-creds": "t0"}), cmd("nbd-server-stop"),
          start("inet", host="127.0.0.1", port="0", **{"tls-creds": "t1"}),
          export(), cmd("object-del", {"id": "t1"}), QUERY,
          files=tls_files(*SERVER_FILES), **IMAGE),
        C("tls-x509-priority-and-sanity-check",
          x509(endpoint="server", priority="NORMAL", **{"sanity-check": False}),
          start_unix(**{"tls-creds": "t0", "tls-authz": "nope"}),
          files=tls_files(*SERVER_FILES), **IMAGE),
        C("tls-psk-missing-keys",
          cmd("object-add", {"qom-type": "tls-creds-psk", "id": "p0", "dir": "{tmp}",
                             "endpoint": "server"}), difference=NO_PSK, **IMAGE),
        C("tls-anon",
          cmd("object-add", {"qom-type": "tls-creds-anon", "id": "a0", "endpoint": "server"}),
          start_unix(**{"tls-creds": "a0"}), difference=NO_ANON, **IMAGE),
    ]


def exports_cases() -> list[Case]:
    return (server_cases() + export_cases() + legacy_cases() + permission_cases()
            + tls_cases())
