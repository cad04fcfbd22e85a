"""The resolved schema: types, members, commands and events as Python objects.

The loader builds these from schema/*.json; validation, the JSON Schema
compiler and introspection all read them. Every reference is resolved, so a
``Member.type`` is the type object itself, never a name to look up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
UINT64_MAX = (1 << 64) - 1


@dataclass(frozen=True)
class IntegerRange:
    """The integers an integer built-in type takes, as QEMU's visitor checks them.

    QEMU visits every integer as an int64 or a uint64 first (``base``; an
    integer QNum that does not fit is refused with that type's text), then
    the narrower types check ``low``..``high`` and name their ``c_type``
    when the value is out of it.  A uint64 also takes negative int64s:
    QEMU casts them, for backward compatibility.  The JSON Schema compiler
    and the input visitor both read these, so the two cannot drift apart.
    """

    base: str
    low: int
    high: int
    c_type: str | None = None  # None: nothing is checked beyond the base


def _signed(bits: int) -> IntegerRange:
    return IntegerRange("int64", -(1 << (bits - 1)), (1 << (bits - 1)) - 1, f"int{bits}_t")


def _unsigned(bits: int) -> IntegerRange:
    return IntegerRange("uint64", 0, (1 << bits) - 1, f"uint{bits}_t")


#: What QEMU's visitor takes as an int64 and as a uint64, the two bases.
INTEGER_BASES: dict[str, tuple[int, int]] = {
    "int64": (INT64_MIN, INT64_MAX),
    "uint64": (INT64_MIN, UINT64_MAX),
}
_INT64 = IntegerRange("int64", *INTEGER_BASES["int64"])
_UINT64 = IntegerRange("uint64", *INTEGER_BASES["uint64"])

#: Every integer built-in type and what it takes.
INTEGER_RANGES: dict[str, IntegerRange] = {
    "int": _INT64,
    "int8": _signed(8),
    "int16": _signed(16),
    "int32": _signed(32),
    "int64": _INT64,
    "uint8": _unsigned(8),
    "uint16": _unsigned(16),
    "uint32": _unsigned(32),
    "uint64": _UINT64,
    "size": _UINT64,
}

#: Built-in type names and the JSON type QEMU's introspection reports for them.
BUILTIN_JSON_TYPES: dict[str, str] = {
    "str": "string",
    **{name: "int" for name in INTEGER_RANGES},
    "number": "number",
    "bool": "boolean",
    "null": "null",
    "any": "value",
}

#: Name QEMU gives the object type with no members (commands without data).
EMPTY_OBJECT_NAME = "q_empty"


@dataclass(eq=False)
class BuiltinType:
    name: str

    @property
    def json_type(self) -> str:
        return BUILTIN_JSON_TYPES[self.name]

    @property
    def integer_range(self) -> IntegerRange | None:
        """What an integer type takes; None for the other built-in types."""
        return INTEGER_RANGES.get(self.name)


@dataclass(eq=False)
class EnumValue:
    name: str
    features: list[str] = field(default_factory=list)


@dataclass(eq=False)
class EnumType:
    name: str
    values: list[EnumValue]
    features: list[str] = field(default_factory=list)
    doc: str = ""

    def __post_init__(self) -> None:
        self.value_names = frozenset(v.name for v in self.values)


@dataclass(eq=False)
class ArrayType:
    element: "Type"

    @property
    def name(self) -> str:
        return f"[{self.element.name}]"


@dataclass(eq=False)
class Member:
    name: str
    type: "Type"
    optional: bool = False
    features: list[str] = field(default_factory=list)
    #: An optional member that QEMU 7.2 requires, made optional by an
    #: extension member (named here): without that one too, an input visit
    #: reports this member missing in its place, as 7.2 does.
    required_unless: str | None = None


@dataclass(eq=False)
class Variant:
    """The branch of a union selected when the tag member has value ``case``."""

    case: str
    type: "ObjectType"


@dataclass(eq=False)
class ObjectType:
    """A struct, or a union (a struct whose ``tag`` member selects variants).

    ``members`` are the type's own members; ``all_members()`` puts the base's
    first, which is the order QEMU visits them in.
    """

    name: str
    members: list[Member]
    base: "ObjectType | None" = None
    tag: str | None = None
    variants: list[Variant] = field(default_factory=list)
    features: list[str] = field(default_factory=list)
    doc: str = ""
    implicit: bool = False

    def all_members(self) -> list[Member]:
        inherited = self.base.all_members() if self.base is not None else []
        return inherited + self.members

    def variant_for(self, case: str) -> "ObjectType | None":
        for variant in self.variants:
            if variant.case == case:
                return variant.type
        return None


@dataclass(eq=False)
class AlternateBranch:
    name: str
    type: "Type"


@dataclass(eq=False)
class AlternateType:
    """One of several types, chosen by the JSON type of the value."""

    name: str
    branches: list[AlternateBranch]
    features: list[str] = field(default_factory=list)
    doc: str = ""


Type = BuiltinType | EnumType | ArrayType | ObjectType | AlternateType


@dataclass(eq=False)
class CommandDef:
    name: str
    arg_type: ObjectType | None
    ret_type: "Type | None"
    boxed: bool = False
    allow_oob: bool = False
    features: list[str] = field(default_factory=list)
    doc: str = ""


@dataclass(eq=False)
class EventDef:
    name: str
    arg_type: ObjectType | None
    boxed: bool = False
    features: list[str] = field(default_factory=list)
    doc: str = ""
