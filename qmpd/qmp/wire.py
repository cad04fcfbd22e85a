"""Serialise replies and events exactly as QEMU 7.2 puts them on the wire.

A client that compares bytes (or logs them) sees what QEMU would send:
- members in QEMU's QDict iteration order: 512 hash buckets (tdb_hash),
  and within a bucket the last inserted member first;
- strings with QEMU's escapes: control characters and everything from
  0x7F up as ``\\uXXXX`` in upper case, beyond the BMP as surrogate pairs;
- floats as C's ``%.17g``;
- each message followed by CR LF.
"""

from __future__ import annotations

from functools import lru_cache

from qmpd.qdict import qdict_order

_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
}


@lru_cache(maxsize=8192)
def _encode_key(key: str) -> str:
    return _encode_string(key)


def _encode_string(text: str) -> str:
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return '"' + text + '"'
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif 0x20 <= code < 0x7F:
            out.append(ch)
        elif code > 0xFFFF:
            code -= 0x10000
            out.append("\\u%04X\\u%04X" % (0xD800 + (code >> 10), 0xDC00 + (code & 0x3FF)))
        else:
            out.append("\\u%04X" % code)
    out.append('"')
    return "".join(out)


class _Text(str):
    """Output already encoded (punctuation, keys), queued among values."""

    __slots__ = ()


_COMMA = _Text(", ")
_CLOSE_BRACE = _Text("}")
_CLOSE_BRACKET = _Text("]")


@lru_cache(maxsize=8192)
def _member_prefix(key: str) -> _Text:
    return _Text(_encode_key(key) + ": ")


def _encode(value, out: list[str]) -> None:
    """Encode with an explicit stack: a client may send values nested 1024
    deep (the parser's limit) and have them echoed back in ``id``, deeper
    than Python's recursion limit allows."""
    stack = [value]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            out.append(value if type(value) is _Text else _encode_string(value))
        elif value is None:
            out.append("null")
        elif value is True:
            out.append("true")
        elif value is False:
            out.append("false")
        elif isinstance(value, int):
            out.append(str(value))
        elif isinstance(value, float):
            out.append("%.17g" % value)
        elif isinstance(value, dict):
            if not value:
                out.append("{}")
                continue
            out.append("{")
            stack.append(_CLOSE_BRACE)
            keys = qdict_order(tuple(value))
            for i in range(len(keys) - 1, -1, -1):
                stack.append(value[keys[i]])
                stack.append(_member_prefix(keys[i]))
                if i:
                    stack.append(_COMMA)
        elif isinstance(value, (list, tuple)):
            if not value:
                out.append("[]")
                continue
            out.append("[")
            stack.append(_CLOSE_BRACKET)
            for i in range(len(value) - 1, -1, -1):
                stack.append(value[i])
                if i:
                    stack.append(_COMMA)
        else:
            raise TypeError(f"cannot encode {type(value).__name__} as QMP JSON")


def encode_message(message: dict) -> bytes:
    """One QMP message as bytes, CR LF included."""
    out: list[str] = []
    _encode(message, out)
    out.append("\r\n")
    return "".join(out).encode("ascii")
