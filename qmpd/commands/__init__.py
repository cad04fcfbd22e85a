"""The command registry: handlers bind to schema commands by name.

Each domain module (core, objects, block, jobs) registers its handlers with
:func:`handler`. At start-up :func:`bind` checks the registry against the
schema in both directions, so a declared command without a handler, or a
handler without a declaration, stops the daemon before it serves anyone.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable

if TYPE_CHECKING:  # pragma: no cover
    from qmpd.block.graph import BlockGraph
    from qmpd.crypto.secrets import SecretStore
    from qmpd.exports.registry import ExportRegistry
    from qmpd.jobs.manager import JobManager
    from qmpd.qmp.session import Session
    from qmpd.schema import Schema

#: Modules whose import registers handlers.
DOMAIN_MODULES = ("core", "objects", "block", "jobs", "exports")


@dataclass
class CommandContext:
    """What a handler may touch: the daemon's registries and the caller."""

    nodes: "BlockGraph"
    jobs: "JobManager"
    #: Every user-created object by id, with its qom-type (ids are one namespace).
    objects: dict[str, str]
    secrets: "SecretStore"
    schema: "Schema"
    exports: "ExportRegistry"
    session: "Session | None"
    command: str
    request_shutdown: Callable[[str], None]
    version_info: Callable[[], dict]


Handler = Callable[[CommandContext, dict], Awaitable[Any]]

_HANDLERS: dict[str, Handler] = {}


def handler(*names: str) -> Callable[[Handler], Handler]:
    """Register an async handler ``(ctx, args) -> return value`` for commands."""

    def register(fn: Handler) -> Handler:
        for name in names:
            if name in _HANDLERS:
                raise RuntimeError(f"two handlers for command '{name}'")
            _HANDLERS[name] = fn
        return fn

    return register


class BindingError(Exception):
    """The schema and the handlers disagree."""


def load_handlers() -> dict[str, Handler]:
    for module in DOMAIN_MODULES:
        try:
            importlib.import_module(f"qmpd.commands.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"qmpd.commands.{module}":
                raise
    return dict(_HANDLERS)


def bind(command_names: set[str]) -> dict[str, Handler]:
    """Return the handler of every declared command, or raise BindingError."""
    handlers = load_handlers()
    missing = sorted(command_names - handlers.keys())
    extra = sorted(handlers.keys() - command_names)
    problems = []
    if missing:
        problems.append("commands declared in the schema without a handler: " + ", ".join(missing))
    if extra:
        problems.append("handlers without a declaration in the schema: " + ", ".join(extra))
    if problems:
        raise BindingError("; ".join(problems))
    return {name: handlers[name] for name in command_names}
