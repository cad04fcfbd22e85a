"""A monitor's ``pretty=on`` output, as QEMU 7.2's qobject_to_json_pretty writes it.

Members and scalars are written as in :mod:`qmpd.qmp.wire` (QDict order,
QEMU's escapes); the layout is QEMU's to_json with pretty set: every member
and element on a line of its own, indented four spaces a level, commas
right after a value, and the closing brace or bracket on a line of its own
even for an empty dict or list (``{`` newline ``}``). Like every monitor
output, each newline goes out as CR LF, and so does the one after the message.
"""

from __future__ import annotations

from qmpd.qmp.wire import _encode_string, qdict_order

_INDENT = "    "


class _Text(str):
    """Layout already written, queued among values."""

    __slots__ = ()


def _scalar(value) -> str:
    if isinstance(value, str):
        return _encode_string(value)
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.17g}"
    raise TypeError(f"cannot encode {type(value).__name__} as QMP JSON")


def encode_pretty(message: dict) -> bytes:
    """One QMP message, pretty-printed, CR LF line ends included."""
    out: list[str] = []
    # An explicit stack: a request's id may nest 1024 deep and comes back in the reply.
    stack: list = [(message, 0)]
    while stack:
        item = stack.pop()
        if type(item) is _Text:
            out.append(item)
            continue
        value, level = item
        if isinstance(value, dict):
            out.append("{")
            stack.append(_Text("\r\n" + _INDENT * level + "}"))
            keys = qdict_order(tuple(value))
            inner = "\r\n" + _INDENT * (level + 1)
            for i in range(len(keys) - 1, -1, -1):
                stack.append((value[keys[i]], level + 1))
                stack.append(_Text(("," if i else "") + inner + _encode_string(keys[i]) + ": "))
        elif isinstance(value, (list, tuple)):
            out.append("[")
            stack.append(_Text("\r\n" + _INDENT * level + "]"))
            inner = "\r\n" + _INDENT * (level + 1)
            for i in range(len(value) - 1, -1, -1):
                stack.append((value[i], level + 1))
                stack.append(_Text(("," if i else "") + inner))
        else:
            out.append(_scalar(value))
    out.append("\r\n")
    return "".join(out).encode("ascii")
