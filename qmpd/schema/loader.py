"""Reading schema/*.json: meta-schema check, then resolution into the model.

Every problem is a :class:`SchemaError` whose message names the file and the
entity (and the member, when one is at fault), because the schema is edited by
hand and a vague message costs more time than it saves to write a good one.
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass

import jsonschema

from qmpd.schema.metaschema import KINDS, META_SCHEMA
from qmpd.schema.model import (
    BUILTIN_JSON_TYPES,
    EMPTY_OBJECT_NAME,
    AlternateBranch,
    AlternateType,
    ArrayType,
    BuiltinType,
    CommandDef,
    EnumType,
    EnumValue,
    EventDef,
    Member,
    ObjectType,
    Type,
    Variant,
)


class SchemaError(Exception):
    """The schema files are malformed; the message names file and entity."""


@dataclass
class _Entry:
    file: str
    kind: str
    name: str
    raw: dict

    def where(self, member: str | None = None) -> str:
        text = f"{self.file}: {self.kind} '{self.name}'"
        if member is not None:
            text += f", member '{member}'"
        return text


@dataclass
class LoadedSchema:
    types: dict[str, Type]
    commands: dict[str, CommandDef]
    events: dict[str, EventDef]
    empty_object: ObjectType
    #: Commands and events interleaved as the files declare them.
    declaration_order: list[CommandDef | EventDef]


_KIND_VALIDATORS = {
    kind: jsonschema.Draft202012Validator(
        {"$ref": f"#/$defs/{kind}", "$defs": META_SCHEMA["$defs"]}
    )
    for kind in KINDS
}


def _reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    result: dict = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key '{key}'")
        result[key] = value
    return result


def _read_entries(directory: pathlib.Path) -> list[_Entry]:
    files = sorted(p for p in directory.iterdir() if p.suffix == ".json" and p.is_file())
    if not files:
        raise SchemaError(f"{directory}: no schema files (*.json)")
    entries = []
    for path in files:
        label = path.name
        try:
            document = json.loads(
                path.read_text(encoding="utf-8"), object_pairs_hook=_reject_duplicate_keys
            )
        except (ValueError, UnicodeDecodeError) as exc:
            raise SchemaError(f"{label}: not valid JSON: {exc}") from None
        if not isinstance(document, list):
            raise SchemaError(f"{label}: a schema file must be a JSON array of definitions")
        for index, raw in enumerate(document):
            entries.append(_check_entry(label, index, raw))
    return entries


def _check_entry(label: str, index: int, raw: object) -> _Entry:
    position = f"{label}: definition #{index}"
    if not isinstance(raw, dict):
        raise SchemaError(f"{position}: a definition must be a JSON object")
    kinds = [k for k in KINDS if k in raw]
    if len(kinds) != 1:
        found = ", ".join(kinds) if kinds else "none"
        raise SchemaError(
            f"{position}: a definition needs exactly one of {', '.join(KINDS)} (found: {found})"
        )
    kind = kinds[0]
    name = raw[kind]
    entry = _Entry(label, kind, name if isinstance(name, str) else repr(name), raw)
    error = jsonschema.exceptions.best_match(_KIND_VALIDATORS[kind].iter_errors(raw))
    if error is not None:
        at = "/".join(str(p) for p in error.absolute_path)
        raise SchemaError(
            f"{entry.where()} (definition #{index}): {error.message}"
            + (f" (at {at})" if at else "")
        )
    return entry


class _Resolver:
    """Turns checked entries into model objects, resolving every name."""

    def __init__(self, entries: list[_Entry]) -> None:
        self.entries = entries
        self.types: dict[str, Type] = {name: BuiltinType(name) for name in BUILTIN_JSON_TYPES}
        self.type_entries: dict[str, _Entry] = {}
        self.commands: dict[str, CommandDef] = {}
        self.events: dict[str, EventDef] = {}
        self.empty = ObjectType(EMPTY_OBJECT_NAME, [], implicit=True)
        self.order: list[CommandDef | EventDef] = []

    def run(self) -> LoadedSchema:
        self._declare()
        for entry in self.entries:
            if entry.kind == "struct":
                self._fill_struct(entry)
        for entry in self.entries:
            if entry.kind == "union":
                self._fill_union(entry)
            elif entry.kind == "alternate":
                self._fill_alternate(entry)
        for entry in self.entries:
            if entry.kind == "command":
                self._add_command(entry)
            elif entry.kind == "event":
                self._add_event(entry)
        return LoadedSchema(self.types, self.commands, self.events, self.empty, self.order)

    # -- declaration: every type exists before any reference is resolved
    def _declare(self) -> None:
        seen_commands: dict[str, _Entry] = {}
        seen_events: dict[str, _Entry] = {}
        for entry in self.entries:
            raw, name = entry.raw, entry.name
            if entry.kind in ("command", "event"):
                seen = seen_commands if entry.kind == "command" else seen_events
                if name in seen:
                    raise SchemaError(f"{entry.where()}: already defined in {seen[name].file}")
                seen[name] = entry
                continue
            if name in self.types:
                other = self.type_entries.get(name)
                origin = f"{other.file} ({other.kind})" if other else "the built-in types"
                raise SchemaError(f"{entry.where()}: type name already defined in {origin}")
            self.type_entries[name] = entry
            features = list(raw.get("features", []))
            doc = raw.get("doc", "")
            if entry.kind == "enum":
                values: list[EnumValue] = []
                for item in raw["data"]:
                    value = (
                        EnumValue(item)
                        if isinstance(item, str)
                        else EnumValue(item["name"], list(item.get("features", [])))
                    )
                    if any(v.name == value.name for v in values):
                        raise SchemaError(f"{entry.where()}: value '{value.name}' listed twice")
                    values.append(value)
                self.types[name] = EnumType(name, values, features, doc)
            elif entry.kind in ("struct", "union"):
                self.types[name] = ObjectType(name, [], features=features, doc=doc)
            else:
                self.types[name] = AlternateType(name, [], features, doc)

    # -- references
    def _type_ref(self, entry: _Entry, ref: object, member: str | None) -> Type:
        if isinstance(ref, list):
            return ArrayType(self._type_ref(entry, ref[0], member))
        typ = self.types.get(ref)  # type: ignore[call-overload]  # any JSON: unknown, reported below
        if typ is None:
            raise SchemaError(f"{entry.where(member)}: unknown type '{ref}'")
        return typ

    def _members(self, entry: _Entry, raw_members: dict, taken: list[Member]) -> list[Member]:
        members: list[Member] = []
        names = {m.name for m in taken}
        for key, spec in raw_members.items():
            optional = key.startswith("*")
            name = key[1:] if optional else key
            if name in names:
                raise SchemaError(
                    f"{entry.where(name)}: member name used twice (directly or through the base)"
                )
            names.add(name)
            features: list[str] = []
            required_unless = None
            if isinstance(spec, dict):
                features = list(spec.get("features", []))
                required_unless = spec.get("required-unless")
                spec = spec["type"]
            members.append(
                Member(name, self._type_ref(entry, spec, name), optional, features, required_unless)
            )
        return members

    def _named_object(self, entry: _Entry, name: str, role: str) -> ObjectType:
        typ = self.types.get(name)
        if typ is None:
            raise SchemaError(f"{entry.where()}: unknown {role} type '{name}'")
        if not isinstance(typ, ObjectType):
            raise SchemaError(f"{entry.where()}: {role} type '{name}' must be a struct or union")
        return typ

    def _fill_struct(self, entry: _Entry) -> None:
        obj = self.types[entry.name]
        assert isinstance(obj, ObjectType)
        if "base" in entry.raw:
            base = self._named_object(entry, entry.raw["base"], "base")
            if base.tag is not None or self.type_entries[base.name].kind != "struct":
                raise SchemaError(f"{entry.where()}: base type '{base.name}' must be a struct")
            obj.base = base
            self._check_base_chain(entry, obj)
        obj.members = self._members(entry, entry.raw["data"], [])

    def _check_base_chain(self, entry: _Entry, obj: ObjectType) -> None:
        seen = {obj.name}
        base = obj.base
        while base is not None:
            if base.name in seen:
                raise SchemaError(f"{entry.where()}: base types form a cycle through '{base.name}'")
            seen.add(base.name)
            base = base.base

    def _fill_union(self, entry: _Entry) -> None:
        raw = entry.raw
        union = self.types[entry.name]
        assert isinstance(union, ObjectType)
        if isinstance(raw["base"], str):
            union.base = self._named_object(entry, raw["base"], "base")
            if self.type_entries[union.base.name].kind != "struct":
                raise SchemaError(
                    f"{entry.where()}: base type '{union.base.name}' must be a struct"
                )
        else:
            base = ObjectType(f"q_obj_{entry.name}-base", [], implicit=True)
            base.members = self._members(entry, raw["base"], [])
            union.base = base
        base_members = union.base.all_members()
        tag = raw["discriminator"]
        tag_member = next((m for m in base_members if m.name == tag), None)
        if tag_member is None:
            raise SchemaError(f"{entry.where()}: discriminator '{tag}' is not a member of the base")
        if tag_member.optional or not isinstance(tag_member.type, EnumType):
            raise SchemaError(
                f"{entry.where()}: discriminator '{tag}' must be a required member of an enum type"
            )
        union.tag = tag
        enum = tag_member.type
        variants = []
        for case, branch_name in raw["data"].items():
            if case not in enum.value_names:
                raise SchemaError(
                    f"{entry.where()}: branch '{case}' is not a value of enum '{enum.name}'"
                )
            branch = self.types.get(branch_name)
            if branch is None:
                raise SchemaError(f"{entry.where(case)}: unknown type '{branch_name}'")
            if not isinstance(branch, ObjectType):
                raise SchemaError(
                    f"{entry.where(case)}: branch type '{branch_name}' must be a struct or union"
                )
            variants.append(Variant(case, branch))
        # Values without a branch select the empty branch, listed after the
        # explicit ones as QEMU does.
        variants += [Variant(v.name, self.empty) for v in enum.values if v.name not in raw["data"]]
        union.variants = variants

    def check_union_branches(self) -> None:
        """Branch members must not clash with base members (needs all types filled)."""
        for entry in self.entries:
            if entry.kind != "union":
                continue
            union = self.types[entry.name]
            assert isinstance(union, ObjectType)
            base_names = {m.name for m in union.all_members()}
            for variant in union.variants:
                for member in variant.type.all_members():
                    if member.name in base_names:
                        raise SchemaError(
                            f"{entry.where(member.name)}: branch '{variant.case}' "
                            "redefines a member of the base"
                        )

    def _fill_alternate(self, entry: _Entry) -> None:
        alternate = self.types[entry.name]
        assert isinstance(alternate, AlternateType)
        categories: dict[str, str] = {}
        for branch_name, ref in entry.raw["data"].items():
            typ = self._type_ref(entry, ref, branch_name)
            category = _json_category(typ)
            if category is None:
                raise SchemaError(
                    f"{entry.where(branch_name)}: type '{typ.name}' cannot be "
                    "a branch of an alternate"
                )
            if category in categories:
                raise SchemaError(
                    f"{entry.where(branch_name)}: branches '{categories[category]}' "
                    f"and '{branch_name}' both take a JSON {category}"
                )
            categories[category] = branch_name
            alternate.branches.append(AlternateBranch(branch_name, typ))

    def _arg_type(self, entry: _Entry) -> ObjectType | None:
        raw = entry.raw
        boxed = raw.get("boxed", False)
        data = raw.get("data")
        if data is None:
            if boxed:
                raise SchemaError(f"{entry.where()}: 'boxed' needs 'data' naming a type")
            return None
        if isinstance(data, str):
            obj = self._named_object(entry, data, "data")
            if not boxed and obj.tag is not None:
                raise SchemaError(f"{entry.where()}: a union as 'data' needs 'boxed': true")
            return obj
        if boxed:
            raise SchemaError(f"{entry.where()}: 'boxed' needs 'data' naming a type")
        return ObjectType(f"q_obj_{entry.name}-arg", self._members(entry, data, []), implicit=True)

    def _add_command(self, entry: _Entry) -> None:
        raw = entry.raw
        ret = self._type_ref(entry, raw["returns"], None) if "returns" in raw else None
        self.commands[entry.name] = CommandDef(
            entry.name,
            self._arg_type(entry),
            ret,
            boxed=raw.get("boxed", False),
            allow_oob=raw.get("allow-oob", False),
            features=list(raw.get("features", [])),
            doc=raw.get("doc", ""),
        )
        self.order.append(self.commands[entry.name])

    def _add_event(self, entry: _Entry) -> None:
        raw = entry.raw
        self.events[entry.name] = EventDef(
            entry.name,
            self._arg_type(entry),
            boxed=raw.get("boxed", False),
            features=list(raw.get("features", [])),
            doc=raw.get("doc", ""),
        )
        self.order.append(self.events[entry.name])


def _json_category(typ: Type) -> str | None:
    if isinstance(typ, ObjectType):
        return "object"
    if isinstance(typ, EnumType):
        return "string"
    if isinstance(typ, BuiltinType):
        return {
            "string": "string",
            "int": "number",
            "number": "number",
            "boolean": "boolean",
            "null": "null",
        }.get(typ.json_type)
    return None


def load_directory(directory: pathlib.Path) -> LoadedSchema:
    """Read, check and resolve every *.json file of ``directory``."""
    if not directory.is_dir():
        raise SchemaError(f"{directory}: schema directory not found")
    resolver = _Resolver(_read_entries(directory))
    loaded = resolver.run()
    resolver.check_union_branches()
    for entry in resolver.entries:
        if entry.kind == "struct":
            obj = loaded.types[entry.name]
            assert isinstance(obj, ObjectType)
            _check_inherited_clashes(entry, obj)
    return loaded


def _check_inherited_clashes(entry: _Entry, obj: ObjectType) -> None:
    names: set[str] = set()
    for member in obj.all_members():
        if member.name in names:
            raise SchemaError(f"{entry.where(member.name)}: member also defined by a base type")
        names.add(member.name)
