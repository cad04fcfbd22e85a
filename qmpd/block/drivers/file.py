"""The ``file`` driver: a POSIX file, its descriptor and its image locks.

Every method is synchronous and meant to run in a worker thread; a lock
serialises them, so concurrent callers from several threads are safe.
Opening follows QEMU's file-posix: errors read "Could not open 'PATH':
<strerror>", ``auto-read-only`` falls back to read-only when the file cannot
be opened for writing, and locking=auto means on (Linux has OFD locks).

cache.direct is accepted and reported but I/O stays buffered: the images
this daemon touches are key headers, where O_DIRECT's alignment rules buy
nothing. cache.no-flush skips fsync as QEMU does.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from dataclasses import dataclass

from qmpd.block.locks import ImageLock
from qmpd.block.permissions import ALL, Perm
from qmpd.posixio import pread_fully, pwrite_fully
from qmpd.errors import QMPError

LOCKING_MODES = ("auto", "on", "off")


def open_error(filename: str, err: OSError) -> QMPError:
    """QEMU's error_setg_file_open wording."""
    return QMPError.generic(f"Could not open '{filename}': {os.strerror(err.errno or errno.EIO)}")


@dataclass
class FileOptions:
    """The runtime options of a file node, as BlockdevOptionsFile + common ones."""

    filename: str
    read_only: bool = False
    auto_read_only: bool = False
    force_share: bool = False
    locking: str = "auto"
    cache_direct: bool = False
    cache_no_flush: bool = False
    discard: str = "ignore"
    aio: str = "threads"

    @classmethod
    def from_qapi(cls, opts: dict) -> "FileOptions":
        cache = opts.get("cache") or {}
        locking = opts.get("locking", "auto")
        if locking not in LOCKING_MODES:
            raise QMPError.generic(f"Parameter 'locking' does not accept value '{locking}'")
        aio = opts.get("aio", "threads")
        if aio == "native" and not cache.get("direct", False):
            raise QMPError.generic("aio=native was specified, but it requires "
                                   "cache.direct=on, which was not specified.")
        if aio == "io_uring":
            raise QMPError.generic("aio=io_uring was specified, but is not supported in this build.")
        return cls(filename=opts["filename"],
                   read_only=bool(opts.get("read-only", False)),
                   auto_read_only=bool(opts.get("auto-read-only", False)),
                   force_share=bool(opts.get("force-share", False)),
                   locking=locking,
                   cache_direct=bool(cache.get("direct", False)),
                   cache_no_flush=bool(cache.get("no-flush", False)),
                   discard=opts.get("discard", "ignore"),
                   aio=aio)


class FileNode:
    """An open image file. ``read_only`` is the node's effective state."""

    def __init__(self, options: FileOptions) -> None:
        if options.force_share and not options.read_only:
            raise QMPError.generic("force-share=on can only be used with read-only images")
        self.options = options
        self.filename = options.filename
        self._mutex = threading.RLock()
        self.read_only = options.read_only
        fd = self._open_fd(writable=not self.read_only,
                           may_fall_back=options.auto_read_only)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise QMPError.generic(
                    f"'file' driver requires '{self.filename}' to be a regular file")
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self.lock = ImageLock(fd, enabled=options.locking != "off")

    def _open_fd(self, writable: bool, may_fall_back: bool) -> int:
        flags = os.O_CLOEXEC | (os.O_RDWR if writable else os.O_RDONLY)
        try:
            return os.open(self.filename, flags)
        except OSError as err:
            if writable and may_fall_back and err.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
                fd = self._open_fd(writable=False, may_fall_back=False)
                self.read_only = True
                return fd
            if err.errno == errno.EROFS:
                err = OSError(errno.EACCES, os.strerror(errno.EACCES))
            raise open_error(self.filename, err) from None

    # -- permissions and locks -------------------------------------------
    @property
    def perm(self) -> tuple[Perm, Perm]:
        return self.lock.perm, self.lock.shared

    def _effective_shared(self, shared: Perm) -> Perm:
        # force-share: the node shares everything whatever its users say.
        return ALL if self.options.force_share else shared

    def check_perm(self, perm: Perm, shared: Perm) -> None:
        """Would (perm, shared) be allowed? Takes and changes nothing."""
        with self._mutex:
            self._check_writable(perm)
            self.lock.check(perm, self._effective_shared(shared))

    def set_perm(self, perm: Perm, shared: Perm) -> None:
        """Move the image locks to (perm, shared), or raise and keep the old ones."""
        with self._mutex:
            self._check_writable(perm)
            self.lock.update(perm, self._effective_shared(shared))

    def _check_writable(self, perm: Perm) -> None:
        if perm & (Perm.WRITE | Perm.WRITE_UNCHANGED) and self.read_only:
            raise QMPError.generic("Block node is read-only")

    # -- I/O ----------------------------------------------------------------
    def pread(self, offset: int, length: int) -> bytes:
        with self._mutex:
            return pread_fully(self._fd, length, offset)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        with self._mutex:
            if self.read_only:
                raise QMPError.generic("Block node is read-only")
            pwrite_fully(self._fd, data, offset)

    def flush(self) -> None:
        with self._mutex:
            if not self.options.cache_no_flush:
                os.fsync(self._fd)

    def size(self) -> int:
        with self._mutex:
            return os.fstat(self._fd).st_size

    def allocated_size(self) -> int:
        """Bytes the file occupies on disk (QEMU's actual-size)."""
        with self._mutex:
            return os.fstat(self._fd).st_blocks * 512

    def truncate(self, size: int) -> None:
        with self._mutex:
            if self.read_only:
                raise QMPError.generic("Block node is read-only")
            os.ftruncate(self._fd, size)

    # -- reopen / close ------------------------------------------------------
    def reopen(self, read_only: bool) -> None:
        """Switch between read-only and read-write on a fresh descriptor.

        The lock bytes move to the new descriptor before the old one closes,
        so other processes never see the image unlocked.
        """
        with self._mutex:
            if read_only == self.read_only:
                return
            if read_only and self.lock.perm & (Perm.WRITE | Perm.WRITE_UNCHANGED):
                raise QMPError.generic("Block node is read-only")
            new_fd = self._open_fd(writable=not read_only, may_fall_back=False)
            old_fd = self._fd
            try:
                self.lock.move_to(new_fd)
            except BaseException:
                self.lock.fd = old_fd
                os.close(new_fd)
                raise
            self._fd = new_fd
            self.read_only = read_only
            self.options.read_only = read_only
            os.close(old_fd)

    def close(self) -> None:
        with self._mutex:
            if self._fd >= 0:
                os.close(self._fd)  # closing the description drops its OFD locks
                self._fd = -1

    @property
    def closed(self) -> bool:
        return self._fd < 0


class FileRegionIO:
    """The LUKS engine's ImageIO over a file node, from ``base`` on.

    ``limit`` bounds the region (a LUKS header inside qcow2 must stay within
    the clusters the FDE extension gives it); reads past the limit return
    short and writes past it are refused with QEMU's text.
    """

    def __init__(self, node: FileNode, base: int = 0, limit: int | None = None) -> None:
        self.node = node
        self.base = base
        self.limit = limit

    def read(self, offset: int, length: int) -> bytes:
        if self.limit is not None:
            length = max(0, min(length, self.limit - offset))
        return self.node.pread(self.base + offset, length)

    def write(self, offset: int, data: bytes) -> None:
        if self.limit is not None and offset + len(data) > self.limit:
            raise QMPError.generic("Request for data outside of extension header")
        self.node.pwrite(self.base + offset, data)

    def sync(self) -> None:
        self.node.flush()

    def size(self) -> int:
        size = max(0, self.node.size() - self.base)
        return size if self.limit is None else min(size, self.limit)
