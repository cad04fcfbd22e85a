"""Turn server-to-client NBD bytes into readable lines (test failure messages).

Heuristic: messages are found by their magic numbers; payloads of simple
read replies and the EXPORT_NAME reply have none, so bytes that start with
no known magic are shown raw up to the next magic.
"""

from __future__ import annotations

import struct

from qmpd.nbd.constants import (
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Rep,
    ReplyType,
)

_MAGICS = [NBDMAGIC.to_bytes(8, "big"), OPTION_REPLY_MAGIC.to_bytes(8, "big"),
           SIMPLE_REPLY_MAGIC.to_bytes(4, "big"), STRUCTURED_REPLY_MAGIC.to_bytes(4, "big")]


def _name(enum, value: int) -> str:
    try:
        return enum(value).name
    except ValueError:
        return hex(value)


def _next_magic(data: bytes, start: int) -> int:
    hits = [i for i in (data.find(m, start) for m in _MAGICS) if i >= 0]
    return min(hits, default=len(data))


def decode(data: bytes) -> list[str]:
    out, pos = [], 0
    while pos < len(data):
        rest = data[pos:]
        if rest.startswith(_MAGICS[0]) and len(rest) >= 18:
            out.append(f"greeting flags={rest[16:18].hex()}")
            pos += 18
        elif rest.startswith(_MAGICS[1]) and len(rest) >= 20:
            opt, rep, n = struct.unpack_from(">III", rest, 8)
            body = rest[20:20 + n]
            out.append(f"option-reply opt={opt} {_name(Rep, rep)} {body!r}")
            pos += 20 + n
        elif rest.startswith(_MAGICS[2]) and len(rest) >= 16:
            err, cookie = struct.unpack_from(">IQ", rest, 4)
            out.append(f"simple cookie={cookie} error={err}")
            pos += 16
        elif rest.startswith(_MAGICS[3]) and len(rest) >= 20:
            flags, typ, cookie, n = struct.unpack_from(">HHQI", rest, 4)
            body = rest[20:20 + n]
            if typ == ReplyType.OFFSET_DATA:
                desc = f"offset={int.from_bytes(body[:8], 'big')} {n - 8} bytes"
            elif typ == ReplyType.OFFSET_HOLE:
                hole_offset, hole_length = struct.unpack(">QI", body)
                desc = f"offset={hole_offset} length={hole_length}"
            elif typ == ReplyType.BLOCK_STATUS:
                ctx = int.from_bytes(body[:4], "big")
                ext = [struct.unpack_from(">II", body, 4 + 8 * i) for i in range((n - 4) // 8)]
                desc = f"context={ctx} extents={ext}"
            elif typ & 0x8000:
                err, mlen = struct.unpack_from(">IH", body)
                desc = f"error={err} {body[6:6 + mlen]!r}"
            else:
                desc = body.hex()
            out.append(f"chunk cookie={cookie} {_name(ReplyType, typ)} flags={flags} {desc}")
            pos += 20 + n
        else:
            end = _next_magic(data, pos + 1)
            raw = data[pos:end]
            out.append(f"raw {len(raw)} bytes {raw[:24].hex()}{'...' if len(raw) > 24 else ''}")
            pos = end
    return out
