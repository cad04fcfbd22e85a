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
import logging
import pathlib

from qmpd.errors import COMMAND_NOT_FOUND, GENERIC_ERROR, QMPError, describe_bug
from qmpd.schema.compiler import compile_validator
from qmpd.schema.input_visitor import first_error
from qmpd.schema.introspection import introspect
from qmpd.schema.loader import SchemaError, load_directory
from qmpd.schema.model import BuiltinType, CommandDef, EventDef, ObjectType, Type

log = logging.getLogger("qmpd.schema")


class ValidatorsDisagree(Exception):
    """The compiled JSON Schema refused a value the QEMU-order walk accepts.

    A bug in qmpd, never the client's fault: integer ranges and the rest
    come from the one schema model, so the two should always agree.
    """


def _not_validated(what: str) -> QMPError:
    return QMPError(
        GENERIC_ERROR, f"The {what} could not be validated (an internal error in qmpd, see its log)"
    )


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
            raise ValidatorsDisagree(self.type.name)
        raise QMPError(GENERIC_ERROR, text)

    def check_or_report(self, value: object, what: str) -> None:
        """`check`, with a bug in the checking logged and answered as a QMPError.

        Only the exception's type and place are logged, never its message
        or the value: arguments may hold secrets.
        """
        try:
            self.check(value)
        except QMPError:
            raise
        except Exception as exc:  # RecursionError on deep input included
            log.error("checking the %s failed: %s", what, describe_bug(exc))
            raise _not_validated(what) from None


class Schema:
    """The QMP API of qmpd: commands, events and their types."""

    def __init__(
        self,
        commands: dict[str, CommandDef],
        events: dict[str, EventDef],
        types: dict[str, Type],
        empty: ObjectType,
        declaration_order: list[CommandDef | EventDef],
    ) -> None:
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
        loaded = load_directory(
            pathlib.Path(directory) if directory is not None else bundled_schema_directory()
        )
        return cls(
            loaded.commands,
            loaded.events,
            loaded.types,
            loaded.empty_object,
            loaded.declaration_order,
        )

    def validate_arguments(self, command: str, arguments: dict | None) -> None:
        """Check a command's arguments (None: the request had none) like QEMU does.

        Raises QMPError("GenericError", QEMU's text) for invalid arguments and
        QMPError("CommandNotFound", ...) for an undeclared command.  A bug in
        the checking itself (the two validators disagree, or one of them
        fails) is logged and raised as a GenericError that says the arguments
        of the command could not be validated: the session goes on.
        """
        check = self._arguments.get(command)
        if check is None:
            raise QMPError(COMMAND_NOT_FOUND, f"The command {command} has not been found")
        check.check_or_report(
            {} if arguments is None else arguments, f"arguments of command '{command}'"
        )

    def validate_event(self, event: str, data: dict | None) -> None:
        """Check an event's data against its declaration (self-checks, tests)."""
        check = self._event_data.get(event)
        if check is None:
            raise QMPError(GENERIC_ERROR, f"Event '{event}' is not declared")
        check.check_or_report({} if data is None else data, f"data of event '{event}'")

    def introspect(self) -> list[dict]:
        """QEMU's SchemaInfo list, the reply of query-qmp-schema (a fresh copy)."""
        if self._introspection is None:
            int_type = self.types["int"]
            assert isinstance(int_type, BuiltinType)
            self._introspection = introspect(self._order, int_type, self._empty)
        return copy.deepcopy(self._introspection)


__all__ = ["Schema", "SchemaError", "CommandDef", "EventDef"]
