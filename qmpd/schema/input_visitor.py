"""Find the error QEMU 7.2 would report for a JSON value, in QEMU's words.

QEMU checks arguments by *visiting* them (qapi/qobject-input-visitor.c driven
by generated code) and stops at the first problem. This module walks a value
in the same order with the same rules and returns that first problem's text:

* members in declaration order, base members first, the union tag before the
  branch's members; an unknown member is reported only when the object it
  sits in has been fully visited (``visit_check_struct``), and when several
  are unknown the one GLib's hash table yields first (see unvisited_keys);
* paths are QEMU's "full names" ('options[0].file.driver'), except in the
  three messages where QEMU prints the bare member name ('null' for list
  elements): an enum value it does not know, an alternate given a JSON type
  none of its branches takes, and a narrow integer out of range;
* numbers follow QEMU's QNum: integers in [-2^63, 2^64) are integers, others
  are doubles; ``int`` takes int64, ``uint64``/``size`` also take negative
  int64 (QEMU casts them, for backward compatibility), ``number`` takes any;
  every integer type's range is the schema model's (``INTEGER_RANGES``),
  which the JSON Schema compiler uses too.

Only the error path uses this walk; valid input is accepted by the compiled
JSON Schema (see compiler), and tests check the two agree.
"""

from __future__ import annotations

from qmpd.schema.model import (
    INT64_MIN,
    INTEGER_BASES,
    UINT64_MAX,
    AlternateType,
    ArrayType,
    BuiltinType,
    EnumType,
    ObjectType,
    Type,
)
from qmpd.schema.unvisited_keys import UnvisitedKeys


class InvalidInput(Exception):
    """The first problem QEMU would report, as QEMU's text."""


def is_qnum_int(value: object) -> bool:
    """True when QEMU's JSON parser would make ``value`` an integer QNum."""
    return (
        isinstance(value, int) and not isinstance(value, bool) and INT64_MIN <= value <= UINT64_MAX
    )


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _Frame:
    __slots__ = ("name", "is_dict", "index", "unvisited")

    def __init__(self, name: str | None, is_dict: bool) -> None:
        self.name = name
        self.is_dict = is_dict
        self.index = 0
        self.unvisited: UnvisitedKeys | None = None


class InputVisitor:
    """One walk over one value; raises :class:`InvalidInput` at the first error."""

    def __init__(self) -> None:
        self._stack: list[_Frame] = []

    # -- names as QEMU prints them
    def full_name(self, name: str | None) -> str:
        text = ""
        for frame in reversed(self._stack):
            if frame.is_dict:
                text = "." + (name if name is not None else "<anonymous>") + text
            else:
                text = f"[{frame.index}]" + text
            name = frame.name
        if name is not None:
            return name + text
        if text.startswith("."):
            return text[1:]
        return text or "<anonymous>"

    @staticmethod
    def bare_name(name: str | None) -> str:
        return name if name is not None else "null"

    def _type_error(self, name: str | None, expected: str) -> InvalidInput:
        return InvalidInput(
            f"Invalid parameter type for '{self.full_name(name)}', expected: {expected}"
        )

    # -- the walk
    def visit_root(self, typ: ObjectType, value: object) -> None:
        self.visit(typ, None, value)

    def visit(self, typ: Type, name: str | None, value: object) -> None:
        if isinstance(typ, ObjectType):
            self._visit_object(typ, name, value)
        elif isinstance(typ, BuiltinType):
            self._visit_builtin(typ, name, value)
        elif isinstance(typ, EnumType):
            if not isinstance(value, str):
                raise self._type_error(name, "string")
            if value not in typ.value_names:
                raise InvalidInput(
                    f"Parameter '{self.bare_name(name)}' does not accept value '{value}'"
                )
        elif isinstance(typ, ArrayType):
            self._visit_array(typ, name, value)
        else:
            self._visit_alternate(typ, name, value)

    def _visit_object(self, typ: ObjectType, name: str | None, value: object) -> None:
        if not isinstance(value, dict):
            raise self._type_error(name, "object")
        frame = _Frame(name, True)
        frame.unvisited = UnvisitedKeys(list(value))
        self._stack.append(frame)
        self._visit_members(typ, value, frame.unvisited)
        unexpected = frame.unvisited.first()
        if unexpected is not None:
            raise InvalidInput(f"Parameter '{self.full_name(unexpected)}' is unexpected")
        self._stack.pop()

    def _visit_members(self, typ: ObjectType, value: dict, unvisited: UnvisitedKeys) -> None:
        for member in typ.all_members():
            if member.name in value:
                unvisited.discard(member.name)
                self.visit(member.type, member.name, value[member.name])
            elif not member.optional or (
                member.required_unless is not None and member.required_unless not in value
            ):
                raise InvalidInput(f"Parameter '{self.full_name(member.name)}' is missing")
        if typ.tag is not None:
            branch = typ.variant_for(value[typ.tag])
            if branch is not None:
                self._visit_members(branch, value, unvisited)

    def _visit_array(self, typ: ArrayType, name: str | None, value: object) -> None:
        if not isinstance(value, list):
            raise self._type_error(name, "array")
        frame = _Frame(name, False)
        self._stack.append(frame)
        for index, element in enumerate(value):
            frame.index = index
            self.visit(typ.element, None, element)
        self._stack.pop()

    def _visit_alternate(self, typ: AlternateType, name: str | None, value: object) -> None:
        for branch in typ.branches:
            if _takes_json_type(branch.type, value):
                self.visit(branch.type, name, value)
                return
        raise InvalidInput(
            f"Invalid parameter type for '{self.bare_name(name)}', expected: {typ.name}"
        )

    def _visit_builtin(self, typ: BuiltinType, name: str | None, value: object) -> None:
        builtin = typ.name
        integers = typ.integer_range
        if integers is not None:
            # QEMU's type_int64 or type_uint64, then the narrower type's range.
            low, high = INTEGER_BASES[integers.base]
            if not (
                isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
            ):
                if integers.base == "int64":
                    raise self._type_error(name, "integer")
                raise InvalidInput(f"Parameter '{self.full_name(name)}' expects uint64")
            if integers.c_type is not None and not integers.low <= value <= integers.high:
                raise InvalidInput(f"Parameter '{self.bare_name(name)}' expects {integers.c_type}")
        elif builtin == "str":
            if not isinstance(value, str):
                raise self._type_error(name, "string")
        elif builtin == "bool":
            if not isinstance(value, bool):
                raise self._type_error(name, "boolean")
        elif builtin == "number":
            if not is_number(value):
                raise self._type_error(name, "number")
        elif builtin == "null":
            if value is not None:
                raise self._type_error(name, "null")
        # "any" takes every value.


def _takes_json_type(typ: Type, value: object) -> bool:
    """Whether an alternate branch of type ``typ`` is the one QEMU picks for ``value``."""
    if isinstance(typ, ObjectType):
        return isinstance(value, dict)
    if isinstance(typ, EnumType):
        return isinstance(value, str)
    assert isinstance(typ, BuiltinType)
    json_type = typ.json_type
    if json_type == "string":
        return isinstance(value, str)
    if json_type in ("int", "number"):
        return is_number(value)
    if json_type == "boolean":
        return isinstance(value, bool)
    return value is None


def first_error(typ: ObjectType, value: object) -> str | None:
    """QEMU's text for the first problem of ``value`` as a ``typ``, or None if valid."""
    try:
        InputVisitor().visit_root(typ, value)
    except InvalidInput as exc:
        return str(exc)
    return None
