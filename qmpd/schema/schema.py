"""The Schema: loaded once at start-up, then asked to check and describe.

``Schema.load()`` reads the bundled schema/*.json (shipped as the package
``qmpd._schema``), checks each file against the meta-schema, resolves every
reference and compiles one JSON Schema validator per command and event.
Checking arguments is then one ``is_valid`` call for valid input; invalid
input is walked the way QEMU visits it to report QEMU's own error text.
"""

from __future__ import annotations

import copy
import importlib.util
import pathlib

from qmpd.errors import COMMAND_NOT_FOUND, GENERIC_ERROR, QMPError
from qmpd.schema.compiler import compile_validator
from qmpd.schema.input_visitor import first_error
from qmpd.schema.introspection import introspect
from qmpd.schema.loader import SchemaError, load_directory
from qmpd.schema.model import BuiltinType, CommandDef, EventDef, ObjectType, Type


def bundled_schema_directory() -> pathlib.Path:
    """Where the schema shipped with qmpd lives (installed package or source tree).

    ``qmpd._schema`` has no __init__.py (it is the top-level schema/ directory
    mapped into the package), so it is a namespace package: ask the import
    system for its directories rather than for a single path.
    """
    try:
        spec = importlib.util.find_spec("qmpd._schema")
    except ModuleNotFoundError:
        spec = None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        path = pathlib.Path(location)
        if any(path.glob("*.json")):
            return path
    return pathlib.Path(__file__).resolve().parents[2] / "schema"


class _TypeCheck:
    """A compiled validator for one type, with QEMU's text on failure."""

    __slots__ = ("type", "validator")

    def __init__(self, typ: ObjectType) -> None:
        self.type = typ
        self.validator = compile_validator(typ)

    def check(self, value: object) -> None:
        if self.validator.is_valid(value):
            return
        text = first_error(self.type, value)
        if text is None:  # the two checkers disagree: a bug here, not the client's
            raise AssertionError(f"schema validators disagree on a value of {self.type.name}")
        raise QMPError(GENERIC_ERROR, text)


class Schema:
    """The QMP API of qmpd: commands, events and their types."""

    def __init__(self, commands: dict[str, CommandDef], events: dict[str, EventDef],
                 types: dict[str, Type], empty: ObjectType,
                 declaration_order: list[CommandDef | EventDef]) -> None:
        self.commands = commands
        self.events = events
        self.types = types
        self._empty = empty
        self._order = declaration_order
        self._arguments = {name: _TypeCheck(c.arg_type or empty) for name, c in commands.items()}
        self._event_data = {name: _TypeCheck(e.arg_type or empty) for name, e in events.items()}
        self._introspection: list[dict] | None = None

    @classmethod
    def load(cls, directory: pathlib.Path | None = None) -> "Schema":
        """Load ``directory`` (default: the bundled schema); raises SchemaError."""
        loaded = load_directory(pathlib.Path(directory) if directory is not None
                                else bundled_schema_directory())
        return cls(loaded.commands, loaded.events, loaded.types, loaded.empty_object,
                   loaded.declaration_order)

    def validate_arguments(self, command: str, arguments: dict | None) -> None:
        """Check a command's arguments (None: the request had none) like QEMU does.

        Raises QMPError("GenericError", QEMU's text) for invalid arguments and
        QMPError("CommandNotFound", ...) for an undeclared command.
        """
        check = self._arguments.get(command)
        if check is None:
            raise QMPError(COMMAND_NOT_FOUND, f"The command {command} has not been found")
        check.check({} if arguments is None else arguments)

    def validate_event(self, event: str, data: dict | None) -> None:
        """Check an event's data against its declaration (self-checks, tests)."""
        check = self._event_data.get(event)
        if check is None:
            raise QMPError(GENERIC_ERROR, f"Event '{event}' is not declared")
        check.check({} if data is None else data)

    def introspect(self) -> list[dict]:
        """QEMU's SchemaInfo list, the reply of query-qmp-schema (a fresh copy)."""
        if self._introspection is None:
            int_type = self.types["int"]
            assert isinstance(int_type, BuiltinType)
            self._introspection = introspect(self._order, int_type, self._empty)
        return copy.deepcopy(self._introspection)


__all__ = ["Schema", "SchemaError", "CommandDef", "EventDef"]
