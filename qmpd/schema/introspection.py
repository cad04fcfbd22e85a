"""query-qmp-schema: the schema as QEMU's SchemaInfo list.

Follows QEMU's scripts/qapi/introspect.py: commands and events in
declaration order, then every type they use, in order of first use. Type
names are masked as decimal numbers in that order (clients are meant to look
at commands and events, not type names); built-in names stay, every integer
type shows as ``int``, arrays are named ``[element]``, and a command without
arguments or return value points at the empty object type.
"""

from __future__ import annotations

from qmpd.schema.model import (
    AlternateType,
    ArrayType,
    BuiltinType,
    CommandDef,
    EnumType,
    EventDef,
    ObjectType,
    Type,
)


class _Introspector:
    def __init__(self, int_type: BuiltinType, empty: ObjectType) -> None:
        self.int_type = int_type
        self.empty = empty
        self.used: list[Type] = []
        self.used_keys: set[str] = set()
        self.masks: dict[str, str] = {}
        self.entries: list[dict] = []

    def _mask(self, name: str) -> str:
        if name not in self.masks:
            self.masks[name] = str(len(self.masks))
        return self.masks[name]

    def _key(self, typ: Type) -> str:
        if isinstance(typ, ArrayType):
            return "[" + self._key(typ.element) + "]"
        return typ.name

    def use(self, typ: Type) -> str:
        if isinstance(typ, BuiltinType) and typ.json_type == "int":
            typ = self.int_type
        elif (
            isinstance(typ, ArrayType)
            and isinstance(typ.element, BuiltinType)
            and typ.element.json_type == "int"
        ):
            typ = ArrayType(self.int_type)
        key = self._key(typ)
        if key not in self.used_keys:
            self.used_keys.add(key)
            self.used.append(typ)
        if isinstance(typ, BuiltinType):
            return typ.name
        if isinstance(typ, ArrayType):
            return "[" + self.use(typ.element) + "]"
        return self._mask(typ.name)

    def _emit(self, name: str, meta_type: str, body: dict, features: list[str]) -> None:
        entry = {"name": name, "meta-type": meta_type, **body}
        if features:
            entry["features"] = list(features)
        self.entries.append(entry)

    def command(self, command: CommandDef) -> None:
        body: dict = {
            "arg-type": self.use(command.arg_type or self.empty),
            "ret-type": self.use(command.ret_type or self.empty),
        }
        if command.allow_oob:
            body["allow-oob"] = True
        self._emit(command.name, "command", body, command.features)

    def event(self, event: EventDef) -> None:
        self._emit(
            event.name,
            "event",
            {"arg-type": self.use(event.arg_type or self.empty)},
            event.features,
        )

    def finish(self) -> list[dict]:
        index = 0
        while index < len(self.used):  # visiting a type may use more types
            self._type(self.used[index])
            index += 1
        return self.entries

    def _type(self, typ: Type) -> None:
        if isinstance(typ, BuiltinType):
            self._emit(typ.name, "builtin", {"json-type": typ.json_type}, [])
        elif isinstance(typ, ArrayType):
            element = self.use(typ.element)
            self._emit(f"[{element}]", "array", {"element-type": element}, [])
        elif isinstance(typ, EnumType):
            members = []
            for value in typ.values:
                member: dict = {"name": value.name}
                if value.features:
                    member["features"] = list(value.features)
                members.append(member)
            self._emit(
                self._mask(typ.name),
                "enum",
                {"members": members, "values": [v.name for v in typ.values]},
                typ.features,
            )
        elif isinstance(typ, AlternateType):
            self._emit(
                self._mask(typ.name),
                "alternate",
                {"members": [{"type": self.use(b.type)} for b in typ.branches]},
                typ.features,
            )
        else:
            body: dict = {"members": []}
            for m in typ.all_members():
                member = {"name": m.name, "type": self.use(m.type)}
                if m.optional:
                    member["default"] = None
                if m.features:
                    member["features"] = list(m.features)
                body["members"].append(member)
            if typ.tag is not None:
                body["tag"] = typ.tag
                body["variants"] = [
                    {"case": v.case, "type": self.use(v.type)} for v in typ.variants
                ]
            self._emit(self._mask(typ.name), "object", body, typ.features)


def introspect(
    declaration_order: list[CommandDef | EventDef], int_type: BuiltinType, empty: ObjectType
) -> list[dict]:
    """The SchemaInfo list for commands and events in declaration order."""
    introspector = _Introspector(int_type, empty)
    for definition in declaration_order:
        if isinstance(definition, CommandDef):
            introspector.command(definition)
        else:
            introspector.event(definition)
    return introspector.finish()
