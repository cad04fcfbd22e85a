"""Byte sequences sent both to qemu-storage-daemon 7.2 and to our server.

record_qsd_nbd.py sends each scenario to a fresh qsd and stores the replies
in tests/data/nbd/qsd_wire.json; test_qsd_wire.py replays them against
NbdServer and compares byte for byte. Every scenario starts on a fresh
connection to a fresh server exporting two copies of the same image:

* ``disk``: writable, ``allocation-depth=on``, no description;
* ``ro``: read-only, description ``read-only disk``;
* ``aligned``: read-only, request alignment 4096 (qsd: blkdebug align=4096).

TLS_SCENARIOS run against a server with x509 credentials (TLS required), up
to the STARTTLS acknowledgement.

The image (:func:`image`) is 1 MiB: 64 KiB of pattern, 64 KiB of written
zeroes (data, not a hole), then a hole to the end.
"""

from __future__ import annotations

import random

from qmpd.nbd.constants import Cmd, CmdFlag, HandshakeFlag, Info, Opt
from tests.nbd.wire import (
    client_flags,
    info_payload,
    meta_payload,
    name_field,
    option,
    request,
)

IMAGE_SIZE = 1 << 20
DATA_END = 64 * 1024
ZEROES_END = 128 * 1024
EXPORTS = [
    {"name": "disk", "writable": True, "allocation_depth": True, "description": None},
    {"name": "ro", "writable": False, "allocation_depth": False, "description": "read-only disk"},
    {"name": "aligned", "writable": False, "allocation_depth": False, "description": None,
     "align": 4096},
]


def image() -> bytes:
    pattern = random.Random(7209).randbytes(DATA_END)
    return pattern + bytes(IMAGE_SIZE - DATA_END)


FIXED = client_flags(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES)
SR = option(Opt.STRUCTURED_REPLY)
BOTH_CONTEXTS = option(Opt.SET_META_CONTEXT, meta_payload(
    b"disk", [b"base:allocation", b"qemu:allocation-depth"]))


def go(name: bytes, *requests: int) -> bytes:
    return option(Opt.GO, info_payload(name, requests))


def info(name: bytes, *requests: int) -> bytes:
    return option(Opt.INFO, info_payload(name, requests))


def structured(name: bytes = b"disk", contexts: bool = True) -> list[bytes]:
    steps = [FIXED, SR]
    if contexts and name == b"disk":
        steps.append(BOTH_CONTEXTS)
    return steps + [go(name)]


PAT = bytes(range(256)) * 16  # 4 KiB

SCENARIOS: dict[str, list[bytes]] = {
    # -- handshake ---------------------------------------------------------
    "oldstyle-flags-export-name": [client_flags(0), option(Opt.EXPORT_NAME, b"disk"),
                                   request(Cmd.READ, 0, 16)],
    "fixed-export-name-no-zeroes": [FIXED, option(Opt.EXPORT_NAME, b"ro")],
    "fixed-export-name-zeroes": [client_flags(HandshakeFlag.FIXED_NEWSTYLE),
                                 option(Opt.EXPORT_NAME, b"disk")],
    "export-name-unknown": [FIXED, option(Opt.EXPORT_NAME, b"nope")],
    "export-name-too-long": [FIXED, option(Opt.EXPORT_NAME, b"n" * 4097)],
    "unknown-client-flags": [client_flags(1 << 2)],
    "not-fixed-option": [client_flags(0), option(Opt.LIST)],
    "bad-option-magic": [FIXED, b"\0" * 16],
    "option-too-long": [FIXED, b"IHAVEOPT" + (Opt.LIST).to_bytes(4, "big")
                        + (32 * 1024 * 1024 + 1).to_bytes(4, "big")],
    "list": [FIXED, option(Opt.LIST), option(Opt.LIST, b"x")],
    "abort": [FIXED, option(Opt.ABORT)],
    "abort-with-data": [FIXED, option(Opt.ABORT, b"junk")],
    "unknown-options": [FIXED, option(99, b"payload"), option(Opt.PEEK_EXPORT),
                        option(0xFFFFFFFF), option(0)],
    "starttls-not-configured": [FIXED, option(Opt.STARTTLS), option(Opt.STARTTLS, b"x")],
    "structured-reply-twice": [FIXED, SR, SR, option(Opt.STRUCTURED_REPLY, b"x")],
    "info-exports": [FIXED, info(b"disk"), info(b"ro"), info(b"ro", Info.NAME, Info.BLOCK_SIZE),
                     info(b"disk", 42, Info.EXPORT, Info.DESCRIPTION)],
    "info-structured": [FIXED, SR, info(b"ro")],
    "info-unknown-export": [FIXED, info(b"nope"), info(b"x" * 100), info(b"y" * 80),
                            info(b"z" * 79)],
    "info-malformed": [
        FIXED,
        option(Opt.INFO, (5000).to_bytes(4, "big") + b"a" * 5000 + b"\0\0"),
        option(Opt.INFO, name_field(b"disk")[:3]),
        option(Opt.INFO, (10).to_bytes(4, "big") + b"disk"),
        option(Opt.INFO, name_field(b"di\0k") + b"\0\0"),
        option(Opt.INFO, info_payload(b"disk") + b"trailing"),
        option(Opt.INFO, name_field(b"disk") + b"\0\x02\0\x01"),
        option(Opt.GO, name_field(b"disk")),
        info(b"disk"),
    ],
    "go-ro-with-name": [FIXED, go(b"ro", Info.NAME)],
    "go-empty-name": [FIXED, go(b"")],
    "go-unknown-then-go": [FIXED, go(b"nope"), go(b"ro")],
    # -- meta contexts -----------------------------------------------------
    "meta-without-structured": [FIXED, option(Opt.LIST_META_CONTEXT, meta_payload(b"disk", []))],
    "meta-list-all": [FIXED, SR, option(Opt.LIST_META_CONTEXT, meta_payload(b"disk", [])),
                      option(Opt.LIST_META_CONTEXT, meta_payload(b"ro", []))],
    "meta-list-queries": [FIXED, SR, option(Opt.LIST_META_CONTEXT, meta_payload(b"disk", [
        b"base:", b"qemu:", b"base:allocation", b"qemu:allocation-depth", b"qemu:dirty-bitmap:",
        b"qemu:bogus", b"other:x", b"", b"base:allocationX"])),
        option(Opt.LIST_META_CONTEXT, meta_payload(b"ro", [b"qemu:", b"qemu:allocation-depth"])),
        option(Opt.LIST_META_CONTEXT, meta_payload(b"disk", [b"qemu:"])),
        option(Opt.LIST_META_CONTEXT, meta_payload(b"disk", [b"base:"]))],
    "meta-set-queries": [FIXED, SR, option(Opt.SET_META_CONTEXT, meta_payload(b"disk", [
        b"base:", b"qemu:", b"base:allocation", b"qemu:allocation-depth"])),
        option(Opt.SET_META_CONTEXT, meta_payload(b"disk", [])),
        option(Opt.SET_META_CONTEXT, meta_payload(b"ro", [b"qemu:allocation-depth",
                                                          b"base:allocation"]))],
    "meta-malformed": [FIXED, SR,
                       option(Opt.SET_META_CONTEXT, meta_payload(b"nope", [b"base:allocation"])),
                       option(Opt.LIST_META_CONTEXT, name_field(b"disk") + b"\0\0\0\x01"
                              + (5000).to_bytes(4, "big") + b"q" * 5000),
                       option(Opt.LIST_META_CONTEXT, name_field(b"disk") + b"\0\0\0\x02"
                              + name_field(b"base:allocation")),
                       option(Opt.LIST_META_CONTEXT, name_field(b"disk") + b"\0\0\0\x01"
                              + name_field(b"base:\0allocation")),
                       option(Opt.LIST_META_CONTEXT, name_field(b"disk")[:6])],
    "meta-set-then-go-other-export": [FIXED, SR,
                                      option(Opt.SET_META_CONTEXT,
                                             meta_payload(b"disk", [b"base:allocation"])),
                                      go(b"ro"), request(Cmd.BLOCK_STATUS, 0, 4096)],
    "meta-failed-set-clears": [FIXED, SR, option(Opt.SET_META_CONTEXT,
                                                 meta_payload(b"disk", [b"base:allocation"])),
                               option(Opt.SET_META_CONTEXT, meta_payload(b"nope", [])),
                               go(b"disk"), request(Cmd.BLOCK_STATUS, 0, 4096)],
    # -- transmission, structured ----------------------------------------
    "read-structured": structured() + [
        request(Cmd.READ, 0, 4096, cookie=11),
        request(Cmd.READ, DATA_END - 512, 1024, cookie=12),
        request(Cmd.READ, ZEROES_END - 4096, 8192, cookie=13),
        request(Cmd.READ, 512 * 1024, 65536, cookie=14),
        request(Cmd.READ, DATA_END - 512, 1024, flags=CmdFlag.DF, cookie=15),
        request(Cmd.READ, 0, 0, cookie=16),
        request(Cmd.READ, IMAGE_SIZE - 512, 1024, cookie=17),
        request(Cmd.READ, IMAGE_SIZE + 1, 0, cookie=18),
        request(Cmd.READ, 0, 32 * 1024 * 1024 + 1, cookie=19),
        request(Cmd.READ, 0, 512, flags=0x20, cookie=20),
        request(Cmd.READ, 0, 512, flags=CmdFlag.FUA, cookie=21),
        request(Cmd.READ, 0, 512, flags=CmdFlag.REQ_ONE, cookie=22),
    ],
    "write-structured": structured() + [
        request(Cmd.WRITE, 4096, 4096, cookie=1, payload=PAT),
        request(Cmd.READ, 4096, 4096, cookie=2),
        request(Cmd.WRITE, 0, 512, flags=CmdFlag.FUA, cookie=3, payload=PAT[:512]),
        request(Cmd.WRITE, IMAGE_SIZE - 256, 512, cookie=4, payload=PAT[:512]),
        request(Cmd.WRITE, 0, 512, flags=CmdFlag.DF, cookie=5, payload=PAT[:512]),
        request(Cmd.WRITE, 100, 0, cookie=6),
        request(Cmd.FLUSH, cookie=7),
        request(Cmd.FLUSH, 0, 4096, flags=CmdFlag.FUA, cookie=8),
        request(Cmd.READ, 0, 1024, cookie=9),
    ],
    "zeroes-trim-cache": structured() + [
        request(Cmd.WRITE_ZEROES, 0, 4096, cookie=1),
        request(Cmd.WRITE_ZEROES, 8192, 4096, flags=CmdFlag.NO_HOLE, cookie=2),
        request(Cmd.WRITE_ZEROES, IMAGE_SIZE - 4096, 8192, cookie=3),
        request(Cmd.WRITE_ZEROES, 0, 512, flags=CmdFlag.REQ_ONE, cookie=4),
        request(Cmd.READ, 0, 16384, cookie=5),
        request(Cmd.TRIM, 16384, 4096, cookie=6),
        request(Cmd.TRIM, 16384, 4096, flags=CmdFlag.FUA, cookie=7),
        request(Cmd.TRIM, IMAGE_SIZE, 1, cookie=8),
        request(Cmd.CACHE, 0, 65536, cookie=9),
        request(Cmd.CACHE, 0, 32 * 1024 * 1024 + 1, cookie=10),
        request(Cmd.CACHE, IMAGE_SIZE, 1, cookie=11),
        request(Cmd.WRITE_ZEROES, 0, 4096, flags=CmdFlag.FAST_ZERO | CmdFlag.NO_HOLE, cookie=12),
    ],
    "block-status": structured() + [
        request(Cmd.BLOCK_STATUS, 0, IMAGE_SIZE, cookie=1),
        request(Cmd.BLOCK_STATUS, 0, IMAGE_SIZE, flags=CmdFlag.REQ_ONE, cookie=2),
        request(Cmd.BLOCK_STATUS, DATA_END - 512, 4096, cookie=3),
        request(Cmd.BLOCK_STATUS, 0, 0, cookie=4),
        request(Cmd.BLOCK_STATUS, IMAGE_SIZE - 512, 4096, cookie=5),
        request(Cmd.BLOCK_STATUS, 256 * 1024, 4096, flags=CmdFlag.REQ_ONE, cookie=6),
        request(Cmd.BLOCK_STATUS, 0, 512, flags=CmdFlag.FUA, cookie=7),
        request(Cmd.BLOCK_STATUS, 0, 512, flags=CmdFlag.DF, cookie=8),
    ],
    "block-status-one-context": [FIXED, SR, option(Opt.SET_META_CONTEXT,
                                                   meta_payload(b"disk", [b"qemu:allocation-depth"])),
                                 go(b"disk"), request(Cmd.BLOCK_STATUS, 0, IMAGE_SIZE)],
    "block-status-not-negotiated": structured(contexts=False) + [
        request(Cmd.BLOCK_STATUS, 0, 4096)],
    "unknown-commands": structured() + [
        request(42, 0, 0, cookie=1), request(8, 0, 0, cookie=2),
        request(42, 0, 0, flags=CmdFlag.NO_HOLE, cookie=3),
        request(42, IMAGE_SIZE, 10, cookie=4)],
    "read-only-export": structured(b"ro") + [
        request(Cmd.WRITE, 0, 512, cookie=1, payload=PAT[:512]),
        request(Cmd.WRITE, IMAGE_SIZE, 512, cookie=2, payload=PAT[:512]),
        request(Cmd.TRIM, 0, 4096, cookie=3),
        request(Cmd.WRITE_ZEROES, 0, 4096, cookie=4),
        request(Cmd.READ, 0, 16, cookie=5),
        request(Cmd.FLUSH, cookie=6),
        request(Cmd.CACHE, 0, 4096, cookie=7)],
    "oversize-write": structured() + [request(Cmd.WRITE, 0, 32 * 1024 * 1024 + 512, cookie=9)],
    "disconnect": structured() + [request(Cmd.DISC)],
    "bad-request-magic": structured() + [b"\x25\x60\x95\x14" + bytes(24)],
    # -- transmission, simple replies ------------------------------------
    "simple-replies": [FIXED, go(b"disk")] + [
        request(Cmd.READ, DATA_END - 512, 1024, cookie=1),
        request(Cmd.READ, IMAGE_SIZE - 512, 1024, cookie=2),
        request(Cmd.READ, 0, 512, flags=CmdFlag.DF, cookie=3),
        request(Cmd.READ, 0, 0, cookie=4),
        request(Cmd.WRITE, 0, 512, cookie=5, payload=PAT[:512]),
        request(Cmd.BLOCK_STATUS, 0, 4096, cookie=6),
        request(42, 0, 0, cookie=7),
        request(Cmd.FLUSH, cookie=8),
        request(Cmd.DISC, cookie=9)],
    "set-meta-without-structured": [FIXED, option(Opt.SET_META_CONTEXT,
                                                  meta_payload(b"disk", [b"base:allocation"]))],
    "meta-set-empty-namespaces": [FIXED, SR, option(Opt.SET_META_CONTEXT,
                                                    meta_payload(b"disk", [b"qemu:", b"base:"]))],
    "no-zeroes-not-fixed": [client_flags(HandshakeFlag.NO_ZEROES), option(Opt.EXPORT_NAME, b"ro")],
    "export-name-structured": [FIXED, SR, option(Opt.EXPORT_NAME, b"disk"),
                               request(Cmd.READ, DATA_END - 512, 1024)],
    "aligned-export": [FIXED, info(b"aligned"), info(b"aligned", Info.BLOCK_SIZE),
                       go(b"aligned"), request(Cmd.READ, 1, 10, cookie=3)],
    "aligned-go-block-size": [FIXED, SR, go(b"aligned", Info.BLOCK_SIZE),
                              request(Cmd.READ, 1, 10, cookie=4),
                              request(Cmd.BLOCK_STATUS, 1, 10, cookie=5)],
    "simple-read-only": [FIXED, go(b"ro"),
                         request(Cmd.WRITE, 0, 512, cookie=1, payload=PAT[:512]),
                         request(Cmd.READ, 0, 8, cookie=2)],
}

TLS_SCENARIOS: dict[str, list[bytes]] = {
    "tls-required-options": [FIXED, option(Opt.LIST), info(b"disk"), SR, go(b"ro"),
                             option(99, b"xyz"), option(Opt.ABORT)],
    "tls-export-name-before-tls": [FIXED, option(Opt.EXPORT_NAME, b"disk")],
    "tls-starttls-with-length": [FIXED, option(Opt.STARTTLS, b"x")],
    "tls-not-fixed": [client_flags(0), option(Opt.STARTTLS)],
    "tls-starttls-ack": [FIXED, option(Opt.STARTTLS)],
}
