"""QEMU's ``key=value,...`` option syntax (util/keyval.c), as qsd's CLI takes it.

``driver=luks,file.driver=file,file.filename=a,,b.img`` becomes
``{"driver": "luks", "file": {"driver": "file", "filename": "a,b.img"}}``:
``,,`` escapes a comma, dots nest, all-digit keys at one level make a list.
An option starting with ``{`` is JSON instead. Values stay strings; the
schema-guided :func:`coerce` turns them into the types a command expects,
as QEMU's keyval input visitor does.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from qmpd.errors import QMPError


class KeyvalError(ValueError):
    pass


def parse(text: str, implied_key: str | None = None) -> dict:
    """Parse one option string (keyval or JSON) into a dict."""
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise KeyvalError(f"JSON parse error, {exc.msg}") from None
        if not isinstance(value, dict):
            raise KeyvalError("option must be a JSON object")
        return value
    flat: list[tuple[str, str]] = []
    pos = 0
    first = True
    while pos <= len(text):
        key_end = _find_unescaped(text, pos, "=,")
        if key_end < len(text) and text[key_end] == "=":
            key = text[pos:key_end]
            value, pos = _read_value(text, key_end + 1)
        elif first and implied_key is not None:
            key = implied_key
            value, pos = _read_value(text, pos)
        else:
            name = text[pos:key_end]
            raise KeyvalError(f"Expected '=' after parameter '{name}'")
        first = False
        if not key:
            raise KeyvalError("Invalid parameter ''")
        flat.append((key, value))
        if pos >= len(text):
            break
    result: dict = {}
    for key, value in flat:
        _insert(result, key.split("."), value, key)
    return _lists_from_digits(result)


def _find_unescaped(text: str, pos: int, stops: str) -> int:
    while pos < len(text) and text[pos] not in stops:
        pos += 1
    return pos


def _read_value(text: str, pos: int) -> tuple[str, int]:
    out = []
    while pos < len(text):
        ch = text[pos]
        if ch == ",":
            if pos + 1 < len(text) and text[pos + 1] == ",":
                out.append(",")
                pos += 2
                continue
            return "".join(out), pos + 1
        out.append(ch)
        pos += 1
    return "".join(out), pos


def _insert(tree: dict, parts: list[str], value: str, key: str) -> None:
    for part in parts[:-1]:
        if not part:
            raise KeyvalError(f"Invalid parameter '{key}'")
        node = tree.setdefault(part, {})
        if not isinstance(node, dict):
            raise KeyvalError(f"Parameters '{key}' used inconsistently")
        tree = node
    last = parts[-1]
    if not last:
        raise KeyvalError(f"Invalid parameter '{key}'")
    if isinstance(tree.get(last), dict):
        raise KeyvalError(f"Parameters '{key}' used inconsistently")
    tree[last] = value


def _lists_from_digits(tree: Any) -> Any:
    if not isinstance(tree, dict):
        return tree
    converted = {k: _lists_from_digits(v) for k, v in tree.items()}
    if converted and all(k.isdigit() for k in converted):
        indexes = sorted(int(k) for k in converted)
        if indexes != list(range(len(indexes))):
            raise KeyvalError("Parameter list indexes must be 0, 1, 2, ...")
        return [converted[str(i)] for i in indexes]
    return converted


_BOOLS = {"on": True, "yes": True, "true": True, "off": False, "no": False, "false": False}


def coerce(arguments: dict, validate: Callable[[dict], None]) -> dict:
    """Convert keyval strings where the schema wants another scalar type.

    Validation errors name the path and the expected type; each one we can
    repair (a string that spells an integer, number or boolean) is repaired
    and validation runs again, until it passes or the error is a real one.
    """
    for _ in range(256):
        try:
            validate(arguments)
            return arguments
        except QMPError as exc:
            desc = exc.desc
            prefix = "Invalid parameter type for '"
            if not desc.startswith(prefix):
                raise
            path, _, expected = desc[len(prefix) :].partition("', expected: ")
            if not _repair(arguments, path, expected):
                raise
    raise QMPError.generic("too many parameters to convert")


def _repair(arguments: dict, path: str, expected: str) -> bool:
    container: Any = arguments
    parts = _split_path(path)
    for part in parts[:-1]:
        container = container[part]
    last = parts[-1]
    value = container[last]
    if not isinstance(value, str):
        return False
    try:
        if expected == "integer":
            container[last] = int(value, 0)
        elif expected == "number":
            container[last] = float(value)
        elif expected == "boolean":
            container[last] = _BOOLS[value]
        else:
            return False
    except (ValueError, KeyError):
        return False
    return True


def _split_path(path: str) -> list:
    parts: list = []
    for piece in path.split("."):
        while "[" in piece:
            name, _, rest = piece.partition("[")
            if name:
                parts.append(name)
            index, _, piece = rest.partition("]")
            parts.append(int(index))
        if piece:
            parts.append(piece)
    return parts
