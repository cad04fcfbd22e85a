"""Compile schema types to JSON Schema (draft 2020-12) validators.

The compiled schema accepts exactly what QEMU's visitor accepts, so valid
input is checked by one ``is_valid`` call and only invalid input pays for
the walk that finds QEMU's error text (input_visitor). Unions become one
closed object schema per branch, picked by an if/then/else chain on the tag; a type that
takes part in a cycle (BlockdevOptions → BlockdevRef → BlockdevOptions) is
emitted once under $defs and referenced, everything else is inlined because
jsonschema resolves $ref on every use.

JSON Schema's "integer" also admits 1.0; QEMU's does not, so the validator
class uses a type checker where integers are Python ints (and not bools).
"""

from __future__ import annotations

import jsonschema
from jsonschema import validators

from qmpd.schema.model import (
    AlternateType,
    ArrayType,
    BuiltinType,
    EnumType,
    Member,
    ObjectType,
    Type,
)


def _is_integer(checker, instance) -> bool:
    return isinstance(instance, int) and not isinstance(instance, bool)


QEMUValidator = validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_integer),
)


def _builtin_schema(typ: BuiltinType) -> dict:
    integers = typ.integer_range  # the model's, which the input visitor checks too
    if integers is not None:
        return {"type": "integer", "minimum": integers.low, "maximum": integers.high}
    return {
        "str": {"type": "string"},
        "bool": {"type": "boolean"},
        "number": {"type": "number"},
        "null": {"type": "null"},
        "any": {},
    }[typ.name]


def _referenced_types(typ: Type) -> list[Type]:
    if isinstance(typ, ObjectType):
        found: list[Type] = [m.type for m in typ.all_members()]
        found += [v.type for v in typ.variants]
        return found
    if isinstance(typ, ArrayType):
        return [typ.element]
    if isinstance(typ, AlternateType):
        return [b.type for b in typ.branches]
    return []


def _cyclic_types(root: Type) -> set[str]:
    """Names of the named types reachable from ``root`` that reach themselves."""
    named: dict[str, Type] = {}
    edges: dict[str, set[str]] = {}

    def key(typ: Type) -> str | None:
        if isinstance(typ, (ObjectType, AlternateType)):
            return typ.name
        return None

    def successors(typ: Type) -> set[str]:
        out: set[str] = set()
        pending = list(_referenced_types(typ))
        while pending:
            child = pending.pop()
            k = key(child)
            if k is not None:
                out.add(k)
                named.setdefault(k, child)
            else:
                pending.extend(_referenced_types(child))
        return out

    stack = [root]
    if key(root):
        named[root.name] = root
    while stack:
        typ = stack.pop()
        k = key(typ)
        if k is None or k in edges:
            if k is None:
                for child in _referenced_types(typ):
                    stack.append(child)
            continue
        edges[k] = successors(typ)
        stack.extend(named[n] for n in edges[k])

    cyclic: set[str] = set()
    for start in edges:
        seen: set[str] = set()
        pending = list(edges[start])
        while pending:
            n = pending.pop()
            if n == start:
                cyclic.add(start)
                break
            if n not in seen:
                seen.add(n)
                pending.extend(edges.get(n, ()))
    return cyclic


class _Compiler:
    def __init__(self, root: Type) -> None:
        self.by_ref = _cyclic_types(root)
        self.defs: dict[str, dict] = {}

    def schema(self, typ: Type) -> dict:
        if isinstance(typ, (ObjectType, AlternateType)) and typ.name in self.by_ref:
            if typ.name not in self.defs:
                self.defs[typ.name] = {}  # placeholder breaks the recursion
                self.defs[typ.name] = self._expand(typ)
            return {"$ref": f"#/$defs/{typ.name}"}
        return self._expand(typ)

    def _expand(self, typ: Type) -> dict:
        if isinstance(typ, BuiltinType):
            return _builtin_schema(typ)
        if isinstance(typ, EnumType):
            return {"type": "string", "enum": [v.name for v in typ.values]}
        if isinstance(typ, ArrayType):
            return {"type": "array", "items": self.schema(typ.element)}
        if isinstance(typ, AlternateType):
            # Branches take disjoint JSON types; the ones that fail fastest go first.
            branches = sorted(typ.branches, key=lambda b: isinstance(b.type, ObjectType))
            return {"anyOf": [self.schema(b.type) for b in branches]}
        return self._object(typ.all_members(), typ)

    def _object(self, members: list[Member], variants_of: ObjectType) -> dict:
        if variants_of.tag is None:
            schema: dict = {
                "type": "object",
                "properties": {m.name: self.schema(m.type) for m in members},
                "additionalProperties": False,
            }
            required = [m.name for m in members if not m.optional]
            if required:
                schema["required"] = required
            either = [
                {"anyOf": [{"required": [m.name]}, {"required": [m.required_unless]}]}
                for m in members
                if m.required_unless is not None
            ]
            if either:
                schema["allOf"] = either
            return schema
        # A union: an if/then/else chain on the tag, each "then" a closed
        # schema of every member its branch allows. The members are checked
        # there and only there: each subschema jsonschema descends into
        # costs microseconds, so none is visited twice.
        tag = variants_of.tag
        chain: dict | bool = False
        for variant in reversed(variants_of.variants):
            chain = {
                "if": {"properties": {tag: {"const": variant.case}}},
                "then": self._object(members + variant.type.all_members(), variant.type),
                "else": chain,
            }
        assert isinstance(chain, dict)
        return {"type": "object", "required": [tag], **chain}


def compile_type(typ: Type) -> dict:
    """A standalone JSON Schema document for values of ``typ``."""
    compiler = _Compiler(typ)
    document = compiler.schema(typ)
    if compiler.defs:
        document = dict(document)
        document["$defs"] = compiler.defs
    document["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return document


def compile_validator(typ: Type) -> jsonschema.protocols.Validator:
    return QEMUValidator(compile_type(typ))
