"""The NBD server's listening sockets, opened as QEMU 7.2's qio_net_listener_open_sync does.

Theory of operation
-------------------
A flat SocketAddress becomes one or more listening trio sockets, with
QEMU's error texts (util/qemu-sockets.c, io/dns-resolver.c):

- ``unix``: the path's length is checked (108 bytes, 107 abstract), a stale
  file at the path is unlinked first (a directory there is an error), then
  bind and listen. Abstract names (Linux) are bound ``tight`` (exact length)
  unless ``tight`` is false (zero-padded to the full sun_path).
- ``inet``: the host and port are resolved once (AI_PASSIVE; numeric when
  asked; the address family from ipv4/ipv6), and every resolved address is
  listened on separately, each trying the ports ``port``..``to``; the server
  starts if any address listens, with the first error otherwise. An IPv6
  wildcard that collides with the IPv4 one is retried as IPv6-only, as QEMU's
  try_bind does.
- ``fd``: over QMP qsd answers "only QEMU supports file descriptor passing"
  (it has no getfd); on the command line the text is a descriptor number of
  an inherited socket, which is put into the listening state.
- ``vsock``: cid and port parsed as unsigned 32-bit decimals, then bind and
  listen (AF_VSOCK; a kernel without it says so when the socket is made).

The backlog is SOMAXCONN: QEMU's NBD server is persistent and does not size
it to max-connections.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

import trio

from qmpd import listeners
from qmpd.errors import QMPError

#: sizeof(struct sockaddr_un.sun_path) on Linux.
SUN_PATH_MAX = 108
BACKLOG = socket.SOMAXCONN
IPPROTO_MPTCP = getattr(socket, "IPPROTO_MPTCP", 262)


def _strerror(err: OSError) -> str:
    return os.strerror(err.errno) if err.errno else str(err)


async def open_listeners(addr: dict, *, monitor: bool = False) -> list[trio.SocketListener]:
    """Listening sockets for a flat SocketAddress; ``monitor``: asked over QMP."""
    kind = addr["type"]
    if kind == "unix":
        return [_listener(unix_socket(addr))]
    if kind == "inet":
        return [_listener(s) for s in await inet_sockets(addr)]
    if kind == "fd":
        if monitor:
            raise QMPError.generic("only QEMU supports file descriptor passing")
        return [_listener(sock) for sock in inherited_sockets(addr["str"])]
    return [_listener(vsock_socket(addr))]


def _listener(sock: socket.socket) -> trio.SocketListener:
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


def unix_path_of(addr: dict) -> str | None:
    """The file a unix listener made (to unlink when it closes); None if abstract."""
    if addr["type"] != "unix" or addr.get("abstract"):
        return None
    return addr["path"]


# -- unix ---------------------------------------------------------------------------


def unix_socket(addr: dict) -> socket.socket:
    """QEMU's unix_listen_saddr."""
    path = addr["path"]
    abstract = bool(addr.get("abstract", False))
    tight = bool(addr.get("tight", True))
    raw = os.fsencode(path)
    if len(raw) > SUN_PATH_MAX or (abstract and len(raw) > SUN_PATH_MAX - 1):
        raise QMPError.generic(f"UNIX socket path '{path}' is too long")
    if not path and not abstract:
        raise QMPError.generic("UNIX socket path must not be empty")
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError as err:
        raise QMPError.generic(f"Failed to create Unix socket: {_strerror(err)}") from None
    try:
        if abstract:
            name = b"\0" + raw
            if not tight:
                name += b"\0" * (SUN_PATH_MAX - len(name))
        else:
            try:
                os.unlink(raw)
            except FileNotFoundError:
                pass
            except OSError as err:
                raise QMPError.generic(
                    f"Failed to unlink socket {path}: {_strerror(err)}"
                ) from None
            name = raw
        try:
            sock.bind(name)
        except OSError as err:
            raise QMPError.generic(f"Failed to bind socket to {path}: {_strerror(err)}") from None
        try:
            sock.listen(BACKLOG)
        except OSError as err:
            raise QMPError.generic(f"Failed to listen on socket: {_strerror(err)}") from None
    except BaseException:
        sock.close()
        raise
    return sock


# -- inet ---------------------------------------------------------------------------


def _family(addr: dict) -> int:
    """QEMU's inet_ai_family_from_address."""
    has4, has6 = "ipv4" in addr, "ipv6" in addr
    v4, v6 = bool(addr.get("ipv4")), bool(addr.get("ipv6"))
    if has4 and has6 and v4 == v6:
        if not v4:
            raise QMPError.generic("Cannot disable IPv4 and IPv6 at same time")
        return socket.AF_UNSPEC
    if (has6 and v6) or (has4 and not v4):
        return socket.AF_INET6
    if (has4 and v4) or (has6 and not v6):
        return socket.AF_INET
    return socket.AF_UNSPEC


def _v6only(addr: dict) -> bool:
    """try_bind's IPV6_V6ONLY: off unless exactly one family was asked for."""
    has4, has6 = "ipv4" in addr, "ipv6" in addr
    both = has4 and has6 and addr.get("ipv4") and addr.get("ipv6")
    return not ((not has4 and not has6) or both)


async def inet_sockets(addr: dict) -> list[socket.socket]:
    """qio_dns_resolver_lookup_sync_inet, then inet_listen_saddr for each address."""
    host, port = addr["host"], addr["port"]
    flags = socket.AI_PASSIVE
    if addr.get("numeric"):
        flags |= socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
    family = _family(addr)
    try:
        infos = await trio.to_thread.run_sync(
            socket.getaddrinfo, host or None, port or None, family, socket.SOCK_STREAM, 0, flags
        )
    except socket.gaierror as err:
        raise QMPError.generic(
            f"address resolution failed for {host}:{port}: {err.strerror}"
        ) from None
    except UnicodeError:
        raise QMPError.generic(
            f"address resolution failed for {host}:{port}: Name or service not known"
        ) from None
    sockets: list[socket.socket] = []
    first_error: QMPError | None = None
    for fam, _type, _proto, _name, sockaddr in infos:
        try:
            sockets.append(_inet_listen_one(addr, fam, sockaddr))
        except QMPError as err:
            first_error = first_error or err
    if not sockets:
        assert first_error is not None
        raise first_error
    return sockets


def _inet_listen_one(addr: dict, family: int, sockaddr: tuple) -> socket.socket:
    """inet_listen_saddr for one resolved address: ports port..to, first free one."""
    port_min = sockaddr[1]
    port_max = addr["to"] if "to" in addr else port_min
    proto = IPPROTO_MPTCP if addr.get("mptcp") else 0
    created = False
    last = errno.EADDRINUSE
    for port in range(port_min, max(port_min, port_max) + 1):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM, proto)
        except OSError as err:
            if created:
                raise QMPError.generic(
                    f"Failed to recreate failed listening socket: {_strerror(err)}"
                ) from None
            last = err.errno or last
            break
        created = True
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            where = (sockaddr[0], port) + tuple(sockaddr[2:])
            if _try_bind(sock, addr, family, where):
                try:
                    sock.listen(BACKLOG)
                    return sock
                except OSError as err:
                    if err.errno != errno.EADDRINUSE:
                        raise QMPError.generic(
                            f"Failed to listen on socket: {_strerror(err)}"
                        ) from None
            last = errno.EADDRINUSE
        except BaseException:
            sock.close()
            raise
        sock.close()
    text = "Failed to find an available port" if created else "Failed to create a socket"
    raise QMPError.generic(f"{text}: {os.strerror(last)}")


def _try_bind(sock: socket.socket, addr: dict, family: int, where: tuple) -> bool:
    """Bind; False if the port is taken, an error for anything else."""
    v6only = _v6only(addr)
    while True:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        try:
            sock.bind(where)
            return True
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                if family == socket.AF_INET6 and not v6only:
                    v6only = True
                    continue
                return False
            raise QMPError.generic(f"Failed to bind socket: {_strerror(err)}") from None


# -- vsock --------------------------------------------------------------------------


def _u32(text: str) -> int | None:
    if not text.isdigit() or not text.isascii():
        return None
    value = int(text, 10)
    return value if value <= 0xFFFFFFFF else None


def vsock_socket(addr: dict) -> socket.socket:
    """QEMU's vsock_listen_saddr."""
    cid, port = _u32(addr["cid"]), _u32(addr["port"])
    if cid is None:
        raise QMPError.generic(f"Failed to parse cid '{addr['cid']}'")
    if port is None:
        raise QMPError.generic(f"Failed to parse port '{addr['port']}'")
    family = getattr(socket, "AF_VSOCK", None)
    try:
        if family is None:
            raise OSError(errno.EAFNOSUPPORT, os.strerror(errno.EAFNOSUPPORT))
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as err:
        raise QMPError.generic(f"Failed to create socket: {_strerror(err)}") from None
    try:
        try:
            sock.bind((cid, port))
        except OSError as err:
            raise QMPError.generic(f"Failed to bind socket: {_strerror(err)}") from None
        try:
            sock.listen(BACKLOG)
        except OSError as err:
            raise QMPError.generic(f"Failed to listen on socket: {_strerror(err)}") from None
    except BaseException:
        sock.close()
        raise
    return sock


# -- fd -----------------------------------------------------------------------------


def inherited_sockets(text: str) -> list[socket.socket]:
    """The listening socket(s) an inherited descriptor number (or a LISTEN_FDNAMES
    name) stands for, checked as every inherited listener is (qmpd.listeners)."""
    try:
        return listeners.inherited_sockets(text)
    except listeners.ListenerError as exc:
        raise QMPError.generic(str(exc)) from None


def describe(addr: dict[str, Any]) -> str:
    """host:port or path, for log lines."""
    if addr["type"] == "inet":
        return f"{addr.get('host')}:{addr.get('port')}"
    return str(addr.get("path") or addr.get("str") or addr)
