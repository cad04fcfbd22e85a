"""The resolved schema: types, members, commands and events as Python objects.

The loader builds these from schema/*.json; validation, the JSON Schema
compiler and introspection all read them. Every reference is resolved, so a
``Member.type`` is the type object itself, never a name to look up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Built-in type names and the JSON type QEMU's introspection reports for them.
BUILTIN_JSON_TYPES: dict[str, str] = {
    "str": "string",
    "int": "int", "int8": "int", "int16": "int", "int32": "int", "int64": "int",
    "uint8": "int", "uint16": "int", "uint32": "int", "uint64": "int",
    "size": "int",
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
