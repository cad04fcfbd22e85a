"""systemd's socket activation and readiness protocol, without libsystemd.

Theory of operation
-------------------
*Socket activation* (sd_listen_fds(3)): a service started for its sockets
gets them as descriptors 3, 4, ... with LISTEN_PID (the pid they are meant
for: ours, else they are not for us), LISTEN_FDS (how many) and optionally
LISTEN_FDNAMES (colon-separated names, systemd's FileDescriptorName=). As
sd_listen_fds(1) does, the variables are removed once read, so a process we
might start does not take the sockets for its own, and the descriptors are
marked close-on-exec.

*Readiness* (sd_notify(3)): NOTIFY_SOCKET names a Unix datagram socket
(a path, or ``@name`` for an abstract one); ``READY=1`` is sent once every
monitor and export accepts connections, ``STOPPING=1`` when shutdown
begins. A failed notification is logged and otherwise ignored: it must
never take the daemon down.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import MutableMapping
from dataclasses import dataclass

log = logging.getLogger("qmpd.systemd")

SD_LISTEN_FDS_START = 3
_ACTIVATION_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class ActivationError(Exception):
    """LISTEN_FDS was meant for us but cannot be used; str() is the text."""


@dataclass(frozen=True)
class Activation:
    """The sockets systemd (or another launcher speaking its protocol) passed us."""

    fds: tuple[int, ...]
    names: tuple[str, ...]

    def by_name(self) -> dict[str, list[int]]:
        named: dict[str, list[int]] = {}
        for fd, name in zip(self.fds, self.names, strict=False):
            named.setdefault(name, []).append(fd)
        return named

    def name_of(self, fd: int) -> str:
        return self.names[self.fds.index(fd)]


def listen_fds(
    environ: MutableMapping[str, str] | None = None, *, pid: int | None = None, unset: bool = True
) -> Activation | None:
    """sd_listen_fds_with_names: the passed sockets, or None if none were passed to us."""
    env = os.environ if environ is None else environ
    listen_pid, count = env.get("LISTEN_PID"), env.get("LISTEN_FDS")
    names_text = env.get("LISTEN_FDNAMES")
    if unset:
        for name in _ACTIVATION_VARIABLES:
            env.pop(name, None)
    if listen_pid is None or count is None:
        return None
    try:
        meant_for = int(listen_pid)
    except ValueError:
        raise ActivationError(f"LISTEN_PID: not a process id: '{listen_pid}'") from None
    if meant_for != (os.getpid() if pid is None else pid):
        log.info("LISTEN_PID=%s is not this process: ignoring LISTEN_FDS", listen_pid)
        return None
    try:
        n = int(count)
        if n < 0:
            raise ValueError
    except ValueError:
        raise ActivationError(f"LISTEN_FDS: not a number of sockets: '{count}'") from None
    fds = tuple(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + n))
    names = names_text.split(":") if names_text is not None else []
    if names_text is not None and len(names) != n:
        raise ActivationError(f"LISTEN_FDNAMES has {len(names)} names for {n} sockets")
    if not names:
        names = ["unknown"] * n  # what sd_listen_fds_with_names reports without names
    for fd in fds:
        try:
            os.set_inheritable(fd, False)
        except OSError:
            raise ActivationError(f"LISTEN_FDS={n}, but descriptor {fd} is not open") from None
    return Activation(fds, tuple(names))


class Notifier:
    """sd_notify to one NOTIFY_SOCKET address."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._target: str | bytes = ("\0" + address[1:]) if address.startswith("@") else address

    @classmethod
    def from_environ(
        cls, environ: MutableMapping[str, str] | None = None, *, unset: bool = True
    ) -> Notifier | None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET")
        if unset:
            env.pop("NOTIFY_SOCKET", None)
        if not address:
            return None
        if not address.startswith(("/", "@")):
            log.warning("NOTIFY_SOCKET=%s: only Unix socket addresses are supported", address)
            return None
        return cls(address)

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines as one datagram; False (logged) if it could not go."""
        message = "\n".join(assignments).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(message, self._target)
        except OSError as exc:
            log.warning("sd_notify to %s failed: %s", self.address, exc.strerror or exc)
            return False
        return True
