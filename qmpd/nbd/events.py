"""What the NBD state machine tells its edge (qmpd.nbd.protocol).

Events come out of :meth:`NbdConnection.receive_data` in order; before
acting on one the edge sends whatever :meth:`NbdConnection.data_to_send`
holds, because replies the state machine produced itself (handshake
replies, errors for invalid requests) precede it on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass

from qmpd.nbd.backend import NbdExport
from qmpd.nbd.constants import Cmd, CmdFlag


class NbdProtocolError(Exception):
    """The connection is closed (or was used out of turn); the edge hangs up."""


@dataclass(frozen=True, slots=True)
class StartTls:
    """The client's STARTTLS was acknowledged: send the pending bytes in the
    clear, run the TLS handshake, then call ``tls_established()``."""


@dataclass(frozen=True, slots=True)
class Negotiated:
    """The handshake is over; transmission on ``export`` begins."""

    export: NbdExport


@dataclass(frozen=True, slots=True)
class Disconnect:
    """Send the pending bytes, then close. ``reason`` is QEMU's text for the
    log ("" for an orderly goodbye); it never contains client data beyond
    numbers and option names."""

    reason: str = ""


class Request:
    """A valid transmission request for the backend (QEMU's NBDRequest).

    ``sparse``: a structured READ without DF, which QEMU answers with hole
    chunks for runs that read as zeroes. ``contexts``: for BLOCK_STATUS, the
    negotiated meta context ids in reply order.
    """

    __slots__ = (
        "command",
        "contexts",
        "cookie",
        "flags",
        "length",
        "offset",
        "payload",
        "sparse",
    )

    def __init__(
        self,
        cookie: int,
        command: int,
        flags: int,
        offset: int,
        length: int,
        payload: bytes | memoryview | None = None,
        sparse: bool = False,
        contexts: tuple[int, ...] = (),
    ) -> None:
        self.cookie = cookie
        self.command = command
        self.flags = flags
        self.offset = offset
        self.length = length
        self.payload = payload
        self.sparse = sparse
        self.contexts = contexts

    @property
    def fua(self) -> bool:
        return bool(self.flags & CmdFlag.FUA)

    def __repr__(self) -> str:  # payloads are guest data: never shown
        name = Cmd(self.command).name if self.command in Cmd._value2member_map_ else self.command
        return (
            f"Request({name}, cookie={self.cookie}, flags={self.flags:#x}, "
            f"offset={self.offset}, length={self.length})"
        )


Event = StartTls | Negotiated | Disconnect | Request
