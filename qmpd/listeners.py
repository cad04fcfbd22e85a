"""Listening sockets the daemon is handed or makes, for QMP monitors and the NBD server.

Theory of operation
-------------------
A management stack either lets the daemon bind its own socket (a Unix
path, or host and port for TCP) or binds it itself and hands the daemon
the descriptor: libvirt's ``fd=N`` (the number of a descriptor the daemon
inherited) or systemd's socket activation (LISTEN_FDS, whose descriptors
may carry names; see :mod:`qmpd.systemd`). An inherited descriptor is
checked before it is used: it must be a *listening* stream socket of the
Unix or Internet families.

qemu-storage-daemon 7.2 calls listen() on whatever descriptor it is given.
Where that fails it prints a text we print too (``Unable to parse FD
number N``, ``File descriptor 'N' is not a socket``, ``Failed to listen on
fd socket: <strerror>``); where it would quietly succeed (a bound socket
nobody made listen, an unbound TCP socket that listen() binds to a random
port) qmpd refuses with a text of its own: such a descriptor is a bug in the
launcher, and a socket on a random port is one nobody can reach.

A descriptor is taken over, not duplicated: closing the listener (at
nbd-server-stop or shutdown) really closes the socket, so clients get
ECONNREFUSED instead of waiting in a backlog nobody accepts from. A
descriptor is taken by one listener at a time.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import socket
import stat
from dataclasses import dataclass

import trio

log = logging.getLogger("qmpd.listeners")

BACKLOG = socket.SOMAXCONN
_INT_MAX = 2**31 - 1
#: What C's strtol accepts before the digits (qemu_strtoi refuses anything after).
_FD_NUMBER = re.compile(r"[ \t\n\v\f\r]*[+-]?[0-9]+")


class ListenerError(Exception):
    """A listener could not be made; str() is the text for the user."""


# -- inherited descriptors ------------------------------------------------------------

#: Names of inherited descriptors (systemd's LISTEN_FDNAMES), each naming one or more.
_named: dict[str, list[int]] = {}
#: Descriptors taken over, with the socket that owns each (free again once it is closed).
_claimed: dict[int, socket.socket] = {}


def register_names(names: dict[str, list[int]]) -> None:
    """Let ``fd=NAME`` (and ``addr.str=NAME``) select these inherited descriptors."""
    for name, fds in names.items():
        _named.setdefault(name, []).extend(fd for fd in fds if fd not in _named.get(name, []))


def named_descriptors() -> dict[str, list[int]]:
    return {name: list(fds) for name, fds in _named.items()}


def parse_fd(text: str) -> int:
    """A descriptor number as QEMU's socket_get_fd parses it (qemu_strtoi, base 10)."""
    if not _FD_NUMBER.fullmatch(text):
        raise ListenerError(f"Unable to parse FD number {text}")
    value = int(text)
    if not -_INT_MAX - 1 <= value <= _INT_MAX:
        raise ListenerError(f"Unable to parse FD number {text}: {os.strerror(errno.ERANGE)}")
    return value


def resolve_fd(text: str) -> list[int]:
    """The descriptors ``fd=TEXT`` means: a registered name, else a number."""
    if text in _named:
        return list(_named[text])
    return [parse_fd(text)]


def check_listening(fd: int, text: str | None = None) -> socket.socket:
    """Take over ``fd`` if it is a listening Unix or TCP stream socket; else ListenerError.

    ``text`` is how the user spelled the descriptor (for the message).
    """
    shown = str(fd) if text is None else text
    owner = _claimed.get(fd)
    if owner is not None and owner.fileno() == fd:
        raise ListenerError(f"File descriptor '{shown}' is already in use")
    try:
        is_socket = fd >= 0 and stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError:
        is_socket = False
    if not is_socket:
        raise ListenerError(f"File descriptor '{shown}' is not a socket")
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:  # pragma: no cover - fstat said it is a socket
        raise ListenerError(
            f"File descriptor '{shown}' is not usable: {os.strerror(exc.errno or errno.EIO)}"
        ) from None
    try:
        problem = _not_listening(sock, shown)
    except BaseException:
        sock.detach()
        raise
    if problem is not None:
        sock.detach()  # not ours to close: the launcher still owns it
        raise ListenerError(problem)
    _claimed[fd] = sock
    os.set_inheritable(fd, False)
    return sock


def _not_listening(sock: socket.socket, shown: str) -> str | None:
    """Why ``sock`` cannot serve, or None; qsd's text where qsd's listen() fails."""
    kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
    if kind in (socket.SOCK_DGRAM, socket.SOCK_RAW):
        return f"Failed to listen on fd socket: {os.strerror(errno.EOPNOTSUPP)}"
    if kind != socket.SOCK_STREAM:
        return f"File descriptor '{shown}' is not a stream socket"
    family = sock.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN)
    if family not in (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6):
        return f"File descriptor '{shown}' is not a Unix or TCP socket"
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        return None
    try:
        sock.getpeername()
        connected = True
    except OSError:
        connected = False
    if connected or (family == socket.AF_UNIX and not sock.getsockname()):
        return f"Failed to listen on fd socket: {os.strerror(errno.EINVAL)}"
    return (
        f"File descriptor '{shown}' is not a listening socket "
        "(the process that passes it must call listen() first)"
    )


def inherited_sockets(text: str) -> list[socket.socket]:
    """``fd=TEXT``: every descriptor it names, checked and taken over."""
    taken: list[socket.socket] = []
    try:
        for fd in resolve_fd(text):
            taken.append(check_listening(fd, text))
    except BaseException:
        for sock in taken:  # all or nothing
            _claimed.pop(sock.fileno(), None)
            sock.detach()
        raise
    return taken


def trio_listener(sock: socket.socket) -> trio.SocketListener:
    sock.setblocking(False)
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


def inherited_listeners(text: str) -> list[trio.SocketListener]:
    return [trio_listener(sock) for sock in inherited_sockets(text)]


def describe(sock: socket.socket) -> str:
    """Where a socket listens, for log lines."""
    try:
        name = sock.getsockname()
    except OSError:
        return "?"
    if isinstance(name, tuple):
        return f"{name[0]}:{name[1]}" if sock.family == socket.AF_INET else f"[{name[0]}]:{name[1]}"
    if isinstance(name, bytes):
        return "@" + name[1:].decode(errors="replace") if name[:1] == b"\0" else os.fsdecode(name)
    return name or "(unnamed)"


# -- what a monitor listens on ---------------------------------------------------------


@dataclass(frozen=True)
class InetAddress:
    """QEMU's InetSocketAddress for a listener (host, port, ``to`` for a port range,
    ipv4/ipv6 to pick the families); opened by qmpd.exports.listeners as QEMU does."""

    host: str
    port: str
    to: int | None = None
    ipv4: bool | None = None
    ipv6: bool | None = None
    numeric: bool = False

    def socket_address(self) -> dict:
        addr: dict = {"type": "inet", "host": self.host, "port": self.port}
        for key in ("to", "ipv4", "ipv6"):
            if getattr(self, key) is not None:
                addr[key] = getattr(self, key)
        if self.numeric:
            addr["numeric"] = True
        return addr


@dataclass(frozen=True)
class UnixAddress:
    """A socket file, or (``abstract``, Linux) a name in the abstract namespace:
    ``tight`` binds exactly the name, else the name zero-padded to 108 bytes."""

    path: str
    abstract: bool = False
    tight: bool = True


SUN_PATH_MAX = 108


def abstract_unix_socket(addr: UnixAddress) -> socket.socket:
    """Listen on an abstract Unix address (nothing on disk to replace or remove)."""
    name = b"\0" + os.fsencode(addr.path)
    if len(name) > SUN_PATH_MAX:
        raise ListenerError(f"UNIX socket path '{addr.path}' is too long")
    if not addr.tight:
        name += b"\0" * (SUN_PATH_MAX - len(name))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(name)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise ListenerError(
            f"Failed to bind socket to @{addr.path}: {os.strerror(exc.errno or errno.EIO)}"
        ) from None
    return sock


@dataclass(frozen=True)
class FdAddress:
    """``fd=TEXT``: an inherited descriptor's number, or a name from LISTEN_FDNAMES."""

    text: str


Address = UnixAddress | InetAddress | FdAddress


@dataclass
class MonitorSpec:
    """A QMP monitor: where it listens and how it writes.

    ``address`` may also be listeners made by the caller. ``origin`` is the
    option that asked for it (``--chardev ...``), the prefix of its errors.
    """

    address: Address | trio.SocketListener | list
    pretty: bool = False
    origin: str | None = None
