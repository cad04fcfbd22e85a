"""One QMP session as a sans-IO state machine.

Theory of operation
-------------------
Bytes from the client go through :meth:`Session.receive`, which runs the
incremental JSON stream parser and sorts what comes out, as QEMU's
handle_qmp_command() does: a message with ``exec-oob`` (and no ``execute``)
is *out of band* and is dispatched at once; everything else, parse errors
included, is *in band* and is dispatched strictly in arrival order.

:meth:`Session.dispatch` then does the checks of QEMU's qmp_dispatch(), in
QEMU's order: JSON object?, envelope members (visited in QDict order, so
that the member QEMU complains about first is the one we complain about),
command lookup (only ``qmp_capabilities`` exists before negotiation),
OOB permission, argument validation. It returns either a finished reply or
a :class:`Call` for the server to run; :meth:`Session.reply` and
:meth:`Session.error_reply` turn a result into the reply message, echoing
``id``. Nothing here touches a socket or a clock.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol

from qmpd.errors import COMMAND_NOT_FOUND, GENERIC_ERROR, QMPError, describe_bug
from qmpd.qmp.stream import JSONStreamParser, Parsed, StreamError
from qmpd.qmp.wire import qdict_order

log = logging.getLogger("qmpd.session")

NEGOTIATION_COMMAND = "qmp_capabilities"
_NOT_NEGOTIATED = "Expecting capabilities negotiation with 'qmp_capabilities'"

#: Capabilities this server offers in its greeting and accepts in ``enable``.
CAPABILITIES = ("oob",)


class CommandDecl(Protocol):
    allow_oob: bool


class CommandTable(Protocol):
    """What the session needs to know of the schema (qmpd.schema.Schema)."""

    commands: Mapping[str, CommandDecl]

    def validate_arguments(self, name: str, arguments: dict) -> None: ...


_NO_ID = object()


@dataclass
class Incoming:
    """A parsed message (or parse failure) waiting to be dispatched."""

    value: Any = None
    parse_error: str | None = None
    oob: bool = False


@dataclass
class Call:
    """A request that passed every check: the server runs its handler."""

    command: str
    arguments: dict
    oob: bool
    id: Any = field(default=_NO_ID)

    @property
    def has_id(self) -> bool:
        return self.id is not _NO_ID


class Session:
    """The protocol state of one client connection."""

    def __init__(self, commands: CommandTable, *, parser: JSONStreamParser | None = None) -> None:
        self._commands = commands
        self._parser = parser or JSONStreamParser()
        self.negotiated = False
        self.oob_enabled = False

    # -- input ---------------------------------------------------------------
    def receive(self, data: bytes | bytearray) -> list[Incoming]:
        items: list[Incoming] = []
        for item in self._parser.feed(data):
            if isinstance(item, StreamError):
                items.append(Incoming(parse_error=item.desc))
            else:
                assert isinstance(item, Parsed)
                value = item.value
                oob = isinstance(value, dict) and "exec-oob" in value and "execute" not in value
                items.append(Incoming(value=value, oob=oob))
        return items

    def pending_bytes(self) -> int:
        return self._parser.pending_bytes()

    # -- dispatch ------------------------------------------------------------
    def dispatch(self, item: Incoming) -> Call | dict:
        """Check a message as QEMU does: a :class:`Call` or an error reply."""
        if item.parse_error is not None:
            return _error_message(GENERIC_ERROR, item.parse_error, _NO_ID)
        request = item.value
        if not isinstance(request, dict):
            return _error_message(GENERIC_ERROR, "QMP input must be a JSON object", _NO_ID)
        request_id = request.get("id", _NO_ID)
        try:
            command, oob = self._check_envelope(request)
            self._check_command(command, oob)
            arguments = request.get("arguments", {})
            self._validate_arguments(command, arguments)
        except QMPError as exc:
            return self.error_reply(exc, request_id)
        return Call(command=command, arguments=arguments, oob=oob, id=request_id)

    def _validate_arguments(self, command: str, arguments: dict) -> None:
        """The command table's check; a bug in it costs one reply, not the session."""
        try:
            self._commands.validate_arguments(command, arguments)
        except QMPError:
            raise
        except Exception as exc:  # never its message: the arguments may hold secrets
            log.error(
                "checking the arguments of command '%s' failed: %s", command, describe_bug(exc)
            )
            raise QMPError.generic(
                f"The arguments of command '{command}' could not be "
                "validated (an internal error in qmpd, see its log)"
            ) from None

    def _check_envelope(self, request: dict) -> tuple[str, bool]:
        allow_oob = self.oob_enabled
        has_exec_key = False
        for member in qdict_order(tuple(request)):
            value = request[member]
            if member == "execute" or (member == "exec-oob" and allow_oob):
                if not isinstance(value, str):
                    raise QMPError.generic(f"QMP input member '{member}' must be a string")
                if has_exec_key:
                    raise QMPError.generic("QMP input member 'execute' clashes with 'exec-oob'")
                has_exec_key = True
            elif member == "arguments":
                if not isinstance(value, dict):
                    raise QMPError.generic("QMP input member 'arguments' must be an object")
            elif member != "id":
                raise QMPError.generic(f"QMP input member '{member}' is unexpected")
        if not has_exec_key:
            raise QMPError.generic("QMP input lacks member 'execute'")
        if "execute" in request:
            return request["execute"], False
        return request["exec-oob"], True

    def _check_command(self, command: str, oob: bool) -> None:
        declared = self._commands.commands.get(command)
        if declared is None or not (self.negotiated or command == NEGOTIATION_COMMAND):
            if not self.negotiated:
                raise QMPError(COMMAND_NOT_FOUND, _NOT_NEGOTIATED)
            raise QMPError(COMMAND_NOT_FOUND, f"The command {command} has not been found")
        if oob and not declared.allow_oob:
            raise QMPError.generic(f"The command {command} does not support OOB")

    # -- negotiation ---------------------------------------------------------
    def negotiate(self, enable: list[str]) -> None:
        """qmp_capabilities: leave negotiation mode, enabling ``enable``."""
        if self.negotiated:
            raise QMPError(
                COMMAND_NOT_FOUND, "Capabilities negotiation is already complete, command ignored"
            )
        for capability in enable:
            if capability not in CAPABILITIES:  # the schema's enum stops this first
                raise QMPError.generic(f"Parameter 'null' does not accept value '{capability}'")
        self.oob_enabled = "oob" in enable
        self.negotiated = True

    # -- output --------------------------------------------------------------
    @staticmethod
    def reply(result: Any, call: Call) -> dict:
        message: dict = {"return": {} if result is None else result}
        if call.has_id:
            message["id"] = call.id
        return message

    @staticmethod
    def error_reply(error: QMPError, request_id: Any = _NO_ID) -> dict:
        if isinstance(request_id, Call):
            request_id = request_id.id
        return _error_message(error.error_class, error.desc, request_id)


def _error_message(error_class: str, desc: str, request_id: Any) -> dict:
    message: dict = {"error": {"class": error_class, "desc": desc}}
    if request_id is not _NO_ID:
        message["id"] = request_id
    return message
