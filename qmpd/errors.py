"""The one error type of the daemon: a QMP error class and QEMU's text."""

from __future__ import annotations

import traceback


class QMPError(Exception):
    """An error to report to a QMP client as ``{"error": {"class", "desc"}}``.

    Raise it where the knowledge is, with QEMU's wording when QEMU has one.
    The description must never contain a secret.
    """

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(desc)
        self.error_class = error_class
        self.desc = desc

    @classmethod
    def generic(cls, desc: str) -> "QMPError":
        return cls("GenericError", desc)

    def to_reply(self) -> dict:
        return {"class": self.error_class, "desc": self.desc}


GENERIC_ERROR = "GenericError"
COMMAND_NOT_FOUND = "CommandNotFound"
DEVICE_NOT_FOUND = "DeviceNotFound"


def describe_bug(exc: BaseException) -> str:
    """An unexpected exception for the log: its type and where, never its message.

    The message of an exception we did not make could hold a secret (a
    passphrase in a value that reached the wrong place); the traceback's
    file, line and function names cannot.
    """
    frames = "; ".join(
        f"{frame.filename}:{frame.lineno} in {frame.name}"
        for frame in traceback.extract_tb(exc.__traceback__)
    )
    return f"{type(exc).__name__} at {frames}"
