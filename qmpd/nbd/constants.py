"""The numbers of the NBD protocol (NetworkBlockDevice/nbd doc/proto.md).

Also QEMU's names for them (nbd/common.c ``nbd_*_lookup``): QEMU puts those
names into the error texts it sends, so we must spell them as QEMU does.
"""

from __future__ import annotations

import errno
from enum import IntEnum, IntFlag

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT": the option magic
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

#: QEMU's NBD_MAX_BUFFER_SIZE: the largest option, READ/WRITE/CACHE length.
MAX_BUFFER_SIZE = 32 * 1024 * 1024
#: QEMU's NBD_MAX_STRING_SIZE: export names, descriptions, context queries.
MAX_STRING_SIZE = 4096
#: QEMU's MAX_NBD_REQUESTS: requests one connection may have in flight.
MAX_REQUESTS_IN_FLIGHT = 16
#: QEMU's NBD_MAX_BLOCK_STATUS_EXTENTS: 1 MiB of extents in one reply chunk.
MAX_BLOCK_STATUS_EXTENTS = 1024 * 1024 // 8
#: Reply to NBD_OPT_EXPORT_NAME without NO_ZEROES: size, flags, 124 zeroes.
EXPORT_NAME_REPLY_ZEROES = 124


class HandshakeFlag(IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class Opt(IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10


class Rep(IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = (1 << 31) + 1
    ERR_POLICY = (1 << 31) + 2
    ERR_INVALID = (1 << 31) + 3
    ERR_PLATFORM = (1 << 31) + 4
    ERR_TLS_REQD = (1 << 31) + 5
    ERR_UNKNOWN = (1 << 31) + 6
    ERR_SHUTDOWN = (1 << 31) + 7
    ERR_BLOCK_SIZE_REQD = (1 << 31) + 8


class Info(IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TransmissionFlag(IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Cmd(IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CmdFlag(IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class ReplyType(IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


REPLY_FLAG_DONE = 1 << 0

#: base:allocation extent flags.
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

BASE_ALLOCATION = "base:allocation"
ALLOCATION_DEPTH = "qemu:allocation-depth"
#: QEMU's context ids (NBD_META_ID_*): clients see them in replies.
CONTEXT_IDS = {BASE_ALLOCATION: 0, ALLOCATION_DEPTH: 1}


class NbdErrno(IntEnum):
    """The errno values of the wire (Linux numbering, whatever the host's)."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


_ERRNO_TO_NBD = {
    errno.EPERM: NbdErrno.EPERM,
    errno.EROFS: NbdErrno.EPERM,
    errno.EIO: NbdErrno.EIO,
    errno.ENOMEM: NbdErrno.ENOMEM,
    errno.EDQUOT: NbdErrno.ENOSPC,
    errno.EFBIG: NbdErrno.ENOSPC,
    errno.ENOSPC: NbdErrno.ENOSPC,
    errno.EOVERFLOW: NbdErrno.EOVERFLOW,
    errno.ENOTSUP: NbdErrno.ENOTSUP,
    errno.EOPNOTSUPP: NbdErrno.ENOTSUP,
    errno.ESHUTDOWN: NbdErrno.ESHUTDOWN,
}


def nbd_errno(system_errno: int | None) -> NbdErrno:
    """QEMU's system_errno_to_nbd_errno(): anything unlisted is EINVAL."""
    return _ERRNO_TO_NBD.get(system_errno or errno.EINVAL, NbdErrno.EINVAL)


_OPT_NAMES: dict[int, str] = {
    Opt.EXPORT_NAME: "export name",
    Opt.ABORT: "abort",
    Opt.LIST: "list",
    Opt.STARTTLS: "starttls",
    Opt.INFO: "info",
    Opt.GO: "go",
    Opt.STRUCTURED_REPLY: "structured reply",
    Opt.LIST_META_CONTEXT: "list meta context",
    Opt.SET_META_CONTEXT: "set meta context",
}
_CMD_NAMES: dict[int, str] = {
    Cmd.READ: "read",
    Cmd.WRITE: "write",
    Cmd.DISC: "disconnect",
    Cmd.FLUSH: "flush",
    Cmd.TRIM: "trim",
    Cmd.CACHE: "cache",
    Cmd.WRITE_ZEROES: "write zeroes",
    Cmd.BLOCK_STATUS: "block status",
}


def opt_name(option: int) -> str:
    """QEMU's nbd_opt_lookup()."""
    return _OPT_NAMES.get(option, "<unknown>")


def cmd_name(command: int) -> str:
    """QEMU's nbd_cmd_lookup()."""
    return _CMD_NAMES.get(command, "<unknown>")
