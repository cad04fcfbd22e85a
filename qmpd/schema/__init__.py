"""The schema engine: schema/*.json loaded, checked, compiled and introspected.

Public surface: :class:`Schema` (``load``, ``commands``, ``events``,
``validate_arguments``, ``validate_event``, ``introspect``),
:class:`SchemaError`, and the definitions :class:`CommandDef` and
:class:`EventDef`.
"""

from qmpd.schema.loader import SchemaError
from qmpd.schema.model import CommandDef, EventDef
from qmpd.schema.schema import Schema

__all__ = ["Schema", "SchemaError", "CommandDef", "EventDef"]
