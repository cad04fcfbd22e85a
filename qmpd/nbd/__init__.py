"""The NBD server: a sans-IO protocol core and its trio edge.

    server = NbdServer(lookup, list_exports, tls=ssl_context)
    await nursery.start(server.serve, [unix_listener(path)])

``lookup``/``list_exports`` hand out objects fitting :class:`NbdExport`;
the core (protocol, handshake, transmission) is usable on its own.
"""

from qmpd.nbd.backend import ExtentLike, NbdExport
from qmpd.nbd.events import Disconnect, NbdProtocolError, Negotiated, Request, StartTls
from qmpd.nbd.protocol import NbdConnection
from qmpd.nbd.server import NbdServer, fd_listener, tcp_listeners, unix_listener

__all__ = [
    "Disconnect",
    "ExtentLike",
    "NbdConnection",
    "NbdExport",
    "NbdProtocolError",
    "NbdServer",
    "Negotiated",
    "Request",
    "StartTls",
    "fd_listener",
    "tcp_listeners",
    "unix_listener",
]
