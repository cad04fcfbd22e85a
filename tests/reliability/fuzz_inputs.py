"""Malformed QMP input: seed messages, a seeded byte mutator, hostile specials."""

from __future__ import annotations

import json
import random

from qmpd.schema import Schema
from qmpd.schema.model import ObjectType

#: Commands never sent by fuzzers: ``quit`` would end the daemon under test.
EXCLUDED = {"quit"}

#: Values of every JSON type; the fuzzer puts each where another type is due.
WRONG_VALUES = [0, -1, 2**63, 2**64 + 1, 1.5, 1e308, "", "x", True, False, None, [], [1],
                {}, {"a": 1}]

SEEDS = [
    b'{"execute": "query-version"}',
    b'{"execute": "query-jobs", "id": 1}',
    b'{"execute": "query-named-block-nodes", "arguments": {"flat": true}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "luks", "node-name": "n0", '
    b'"key-secret": "s0", "file": {"driver": "file", "filename": "/nonexistent/x"}}}',
    b'{"execute": "x-blockdev-amend", "arguments": {"job-id": "j", "node-name": "n0", '
    b'"options": {"driver": "luks", "state": "active", "new-secret": "s1"}}}',
    b'{"execute": "job-cancel", "arguments": {"id": "j"}, "id": {"a": [1, 2.5, null]}}',
    b'{"exec-oob": "query-version", "id": "o"}',
    b'{"execute": "object-add", "arguments": {"qom-type": "secret", "id": "s9", "data": "x"}}',
    b"{'execute': 'query-commands', 'id': '\\u00e9\\''}",
    b'[{"execute": "query-version"}]',
    b'"just a string"',
    b'123456789012345678901234567890',
]

#: Byte strings that need no mutator to be hostile.
SPECIALS = [
    b"{", b"}", b"[", b"]", b"{{{{", b'{"execute"', b'{"execute": "query-version"',
    b'{"execute": "query-', b"\x00\x01\x02", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
    b'"\xff\xfe"', b'{"execute": "\xe9"}', b"%d", b"nul", b"truefalse", b"-", b"0e5", b"1e999",
    b"-1e999", b"99999999999999999999999999999999999999", b'"\\ud800"', b'"\\u0000"',
    b"[" * 1100 + b"]" * 1100, b"{\"a\":" * 1100 + b"1" + b"}" * 1100,
    b'{"execute": "query-version", "id": ' + b"9" * 5000 + b"}",
    b'{"execute": "query-version", "arguments": {}, "arguments": {}}',
    b'{"execute": "query-version", "execute": "query-jobs"}',
    b'{"execute": "query-version", "exec-oob": "query-version"}',
    b'{"execute": "query-version", "unknown": 1}',
    b'{"execute": "query-version", "arguments": []}',
    b'{"execute": 5}', b'{"execute": null}', b'{"execute": ["query-version"]}',
    b'{"execute": "query-version", "id": ' + b"[" * 600 + b"]" * 600 + b"}",
]


def huge_string_message(n: int) -> bytes:
    return b'{"execute": "query-version", "id": "' + b"A" * n + b'"}'


def mutate(rng: random.Random, data: bytes) -> bytes:
    """One to four random edits of ``data`` (truncate, flip, insert, delete, splice)."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(8)
        pos = rng.randint(0, len(buf))
        if op == 0:
            del buf[pos:]
        elif op == 1 and buf:
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 2:
            buf[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif op == 3:
            buf[pos:pos] = rng.choice([b"\xc3", b"\xe2\x82", b"\xff", b"\x80", b"\xed\xbf\xbf",
                                       b"\xf0\x9f\x98", b"\x00", b"\\", b'"', b"'"])
        elif op == 4:
            del buf[pos:pos + rng.randint(1, 8)]
        elif op == 5:
            buf[pos:pos] = rng.choice(b"{}[]:,\"' ").to_bytes(1, "big") * rng.randint(1, 3)
        elif op == 6:
            other = rng.choice(SEEDS)
            cut = rng.randint(0, len(other))
            buf[pos:] = other[cut:]
        else:
            buf[pos:pos] = rng.choice([b"1e400", b"-0", b"18446744073709551616", b"null",
                                       b"true", b"\"\\u", b"\"\\uDC00\"", b"[]", b"{}"])
    return bytes(buf)


def _members(typ: ObjectType):
    seen = set()
    while typ is not None:
        for member in typ.members:
            if member.name not in seen:
                seen.add(member.name)
                yield member
        for variant in typ.variants:
            if isinstance(variant.type, ObjectType):
                yield from _members(variant.type)
        typ = typ.base


def argument_paths(schema: Schema) -> list[tuple[str, tuple[str, ...]]]:
    """(command, path) for every argument member, nested objects included."""
    out = []

    def walk(command: str, typ: ObjectType, prefix: tuple[str, ...], depth: int) -> None:
        for member in _members(typ):
            path = prefix + (member.name,)
            out.append((command, path))
            if isinstance(member.type, ObjectType) and depth < 3:
                walk(command, member.type, path, depth + 1)

    for name, command in schema.commands.items():
        if name in EXCLUDED or command.arg_type is None:
            continue
        walk(name, command.arg_type, (), 0)
    return out


def nested(path: tuple[str, ...], value) -> dict:
    for key in reversed(path):
        value = {key: value}
    return value


def wrong_type_messages(schema: Schema) -> list[bytes]:
    """Every argument of every command given each wrong kind of value."""
    out = []
    for command, path in argument_paths(schema):
        for value in WRONG_VALUES:
            out.append(json.dumps({"execute": command, "arguments": nested(path, value),
                                   "id": [command, *path]}).encode())
    return out
