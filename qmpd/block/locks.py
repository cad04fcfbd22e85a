"""Image locks that QEMU understands: OFD byte locks on the image file.

QEMU's file driver (block/file-posix.c) expresses its permissions across
processes with shared (read) open-file-description locks on single bytes:

* byte 100+n is held while the node takes permission n,
* byte 200+n is held while the node refuses to share permission n,

with n the bit index of the permission (0 consistent read, 1 write,
2 write unchanged, 3 resize). Nobody ever keeps an exclusive lock; a process
*tests* for one instead: wanting permission n, it asks whether an exclusive
lock on byte 200+n could be taken (someone refuses to share n); refusing to
share n, it asks the same of byte 100+n (someone holds n). OFD locks belong
to the open file description, so a test never sees the tester's own bytes,
but does see those of another descriptor of the same process.

The update protocol mirrors QEMU's prepare/commit/abort: *prepare* adds the
union of old and new bytes then tests for conflicts; *commit* drops what the
new state does not need; *abort* returns to the old state.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from qmpd.block.permissions import ALL, PERM_ORDER, Perm, perm_names
from qmpd.errors import QMPError

LOCK_PERM_BASE = 100
LOCK_SHARED_BASE = 200

# Linux values; Python exposes them from 3.9 on some builds only.
F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)

# struct flock on Linux: short l_type, short l_whence, off_t l_start,
# off_t l_len, pid_t l_pid (native alignment, padded to 32 bytes on LP64).
_FLOCK = struct.Struct("@hhqqi")
_FLOCK_SIZE = max(32, _FLOCK.size)


def _pack_flock(lock_type: int, start: int, length: int) -> bytes:
    raw = _FLOCK.pack(lock_type, os.SEEK_SET, start, length, 0)
    return raw + bytes(_FLOCK_SIZE - len(raw))


def ofd_lock_byte(fd: int, offset: int) -> None:
    """Take a shared OFD lock on one byte; raises OSError (EAGAIN) on conflict."""
    fcntl.fcntl(fd, F_OFD_SETLK, _pack_flock(fcntl.F_RDLCK, offset, 1))


def ofd_unlock_byte(fd: int, offset: int) -> None:
    fcntl.fcntl(fd, F_OFD_SETLK, _pack_flock(fcntl.F_UNLCK, offset, 1))


def ofd_byte_is_held(fd: int, offset: int) -> bool:
    """True if another open file description holds a lock on the byte."""
    answer = fcntl.fcntl(fd, F_OFD_GETLK, _pack_flock(fcntl.F_WRLCK, offset, 1))
    lock_type = _FLOCK.unpack(answer[: _FLOCK.size])[0]
    return lock_type != fcntl.F_UNLCK


def _lock_failure(text: str, err: OSError) -> QMPError:
    # QEMU leaves out the errno text for the ordinary "someone else holds it".
    if err.errno in (errno.EAGAIN, errno.EACCES):
        return QMPError.generic(text)
    return QMPError.generic(f"{text}: {os.strerror(err.errno or 0)}")


def lock_hint(filename: str) -> str:
    """QEMU's hint after a lock failure (printed by tools, not sent over QMP)."""
    return f"Is another process using the image [{filename}]?"


class ImageLock:
    """The lock bytes one file descriptor holds for one file node.

    ``enabled`` is False for locking=off: every call then does nothing, as
    in QEMU. Not thread-safe by itself; the file node serialises calls.
    """

    def __init__(self, fd: int, enabled: bool) -> None:
        self.fd = fd
        self.enabled = enabled
        self.perm = Perm(0)  # what the node has committed to
        self.shared = ALL
        self.locked_perm = Perm(0)  # bytes 100+n held right now
        self.locked_unshared = Perm(0)  # bytes 200+n held right now

    # -- byte bookkeeping -------------------------------------------------
    def _apply(self, fd: int, perm_bits: Perm, unshared_bits: Perm, unlock: bool) -> None:
        for base, want, attr in (
            (LOCK_PERM_BASE, perm_bits, "locked_perm"),
            (LOCK_SHARED_BASE, unshared_bits, "locked_unshared"),
        ):
            for n, p in enumerate(PERM_ORDER):
                held = getattr(self, attr)
                if want & p and not held & p:
                    try:
                        ofd_lock_byte(fd, base + n)
                    except OSError as err:
                        raise _lock_failure(f"Failed to lock byte {base + n}", err) from None
                    setattr(self, attr, held | p)
                elif unlock and held & p and not want & p:
                    try:
                        ofd_unlock_byte(fd, base + n)
                    except OSError as err:
                        raise QMPError.generic(
                            f"Failed to unlock byte {base + n}: {os.strerror(err.errno or 0)}"
                        ) from None
                    setattr(self, attr, held & ~p)

    def check(self, perm: Perm, shared: Perm) -> None:
        """Test, without taking anything, whether others allow (perm, shared)."""
        if not self.enabled:
            return
        for n, p in enumerate(PERM_ORDER):
            if perm & p and self._held_by_others(LOCK_SHARED_BASE + n):
                raise QMPError.generic(f'Failed to get "{perm_names(p)}" lock')
        for n, p in enumerate(PERM_ORDER):
            if not shared & p and self._held_by_others(LOCK_PERM_BASE + n):
                raise QMPError.generic(f'Failed to get shared "{perm_names(p)}" lock')

    def _held_by_others(self, offset: int) -> bool:
        try:
            return ofd_byte_is_held(self.fd, offset)
        except OSError as err:
            raise _lock_failure("Failed to test lock byte", err) from None

    # -- QEMU's prepare / commit / abort ----------------------------------
    def prepare(self, perm: Perm, shared: Perm) -> None:
        """Take the bytes old and new states need, then test; undo on failure."""
        if not self.enabled:
            return
        if (self.perm | perm) == self.perm and (self.shared & shared) == self.shared:
            return  # only releasing: cannot conflict
        try:
            self._apply(
                self.fd, self.perm | perm, Perm(ALL & (~self.shared | ~shared)), unlock=False
            )
            self.check(perm, shared)
        except QMPError:
            self.abort()
            raise

    def commit(self, perm: Perm, shared: Perm) -> None:
        self.perm, self.shared = Perm(perm), Perm(shared)
        if self.enabled:
            self._apply(self.fd, self.perm, Perm(ALL & ~self.shared), unlock=True)

    def abort(self) -> None:
        if self.enabled:
            self._apply(self.fd, self.perm, Perm(ALL & ~self.shared), unlock=True)

    def update(self, perm: Perm, shared: Perm) -> None:
        """prepare + commit: move to (perm, shared) or raise and stay."""
        self.prepare(perm, shared)
        self.commit(perm, shared)

    def move_to(self, new_fd: int) -> None:
        """Hold the same bytes on ``new_fd`` (reopen); the caller closes the old fd.

        Shared locks never conflict with shared locks, so this cannot fail
        because of other holders; QEMU transfers them the same way.
        """
        held_perm, held_unshared = self.locked_perm, self.locked_unshared
        self.locked_perm, self.locked_unshared = Perm(0), Perm(0)
        self.fd = new_fd
        if self.enabled:
            self._apply(new_fd, held_perm, held_unshared, unlock=False)
