"""The one error type of the daemon: a QMP error class and QEMU's text."""

from __future__ import annotations


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
