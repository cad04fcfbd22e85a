"""The ``file`` driver: a POSIX file, its descriptor and its image locks.

:class:`FileNode` is the open file; :class:`FileBlockNode` is the graph's
node over it, with the data path (pread/pwrite/fdatasync, SEEK_DATA and
SEEK_HOLE for block status, fallocate punch-hole and zero-range where the
filesystem has them). Every method is synchronous and meant to run in a
worker thread; metadata changes (reopen, locks, truncate) take a lock, data
I/O uses positioned calls on the descriptor and needs none.
Opening follows QEMU's file-posix: errors read "Could not open 'PATH':
<strerror>", ``auto-read-only`` falls back to read-only when the file cannot
be opened for writing, and locking=auto means on (Linux has OFD locks).

cache.direct is accepted and reported but I/O stays buffered (O_DIRECT's
alignment rules would bounce every unaligned guest request and buy nothing
for images this daemon holds). cache.no-flush skips fsync as QEMU does.
The node's length is the file size rounded up to 512 bytes, as QEMU's
bdrv_getlength counts sectors; the tail past the end of the file reads as
zeroes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

from qmpd.block.datapath import Extent, waiting_forbidden
from qmpd.block.drivers.base import BlockDriver, OpenFlags
from qmpd.block.locks import ImageLock
from qmpd.block.node import Node, in_thread
from qmpd.block.permissions import ALL, Perm
from qmpd.errors import QMPError
from qmpd.posixio import pread_fully, pwrite_fully

if TYPE_CHECKING:  # pragma: no cover
    from qmpd.block.graph import BlockGraph

LOCKING_MODES = ("auto", "on", "off")
INT64_MAX = (1 << 63) - 1

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc: ctypes.CDLL | None
try:  # ctypes calls release the GIL; os has no fallocate with flags
    _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    _libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long)
except (OSError, AttributeError):  # pragma: no cover - not Linux
    _libc = None


class ResizeError(QMPError):
    """QEMU's "Could not resize file: <strerror>", keeping the errno (the luks
    create replaces an EFBIG with its own text, as block/crypto.c does)."""

    def __init__(self, errno_: int, prefix: str) -> None:
        super().__init__("GenericError", f"{prefix}: {os.strerror(errno_)}")
        self.errno = errno_


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
            raise QMPError.generic(
                "aio=native was specified, but it requires "
                "cache.direct=on, which was not specified."
            )
        if aio == "io_uring":
            raise QMPError.generic(
                "aio=io_uring was specified, but is not supported in this build."
            )
        return cls(
            filename=opts["filename"],
            read_only=bool(opts.get("read-only", False)),
            auto_read_only=bool(opts.get("auto-read-only", False)),
            force_share=bool(opts.get("force-share", False)),
            locking=locking,
            cache_direct=bool(cache.get("direct", False)),
            cache_no_flush=bool(cache.get("no-flush", False)),
            discard=opts.get("discard", "ignore"),
            aio=aio,
        )


class FileNode:
    """An open image file. ``read_only`` is the node's effective state."""

    def __init__(self, options: FileOptions) -> None:
        if options.force_share and not options.read_only:
            raise QMPError.generic("force-share=on can only be used with read-only images")
        self.options = options
        self.filename = options.filename
        self._mutex = threading.RLock()
        self.read_only = options.read_only
        fd = self._open_fd(writable=not self.read_only, may_fall_back=options.auto_read_only)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise QMPError.generic(
                    f"'file' driver requires '{self.filename}' to be a regular file"
                )
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self.lock = ImageLock(fd, enabled=options.locking != "off")
        # Guest I/O runs concurrently on the descriptor; reopen and close
        # wait for it (a closed descriptor's number could be reused).
        self._idle = threading.Condition(self._mutex)
        self._in_flight = 0

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
    @contextmanager
    def _io(self) -> Iterator[int]:
        """The descriptor, held open for one I/O that runs outside the mutex."""
        with self._mutex:
            if self._fd < 0:
                raise OSError(errno.EBADF, "the image is closed")
            self._in_flight += 1
            fd = self._fd
        try:
            yield fd
        finally:
            with self._mutex:
                self._in_flight -= 1
                if not self._in_flight:
                    self._idle.notify_all()

    def _quiesce(self) -> None:
        """Wait (holding the mutex) until no I/O uses the descriptor."""
        while self._in_flight:
            self._idle.wait()

    def pread(self, offset: int, length: int) -> bytes:
        if waiting_forbidden():
            return self._pread_cached(offset, length)
        with self._io() as fd:
            return pread_fully(fd, length, offset)

    def _pread_cached(self, offset: int, length: int) -> bytes:
        """Only from the page cache (RWF_NOWAIT); BlockingIOError otherwise."""
        buffer = bytearray(length)
        with self._io() as fd:
            done = os.preadv(fd, [buffer], offset, os.RWF_NOWAIT)
        if done != length:
            raise BlockingIOError(errno.EAGAIN, "not all in the page cache")
        return bytes(buffer)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self.read_only:
            raise QMPError.generic("Block node is read-only")
        with self._io() as fd:
            pwrite_fully(fd, data, offset)

    def flush(self) -> None:
        if not self.options.cache_no_flush:
            with self._io() as fd:
                os.fdatasync(fd)

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        """Linux fallocate(2) with flags (punch hole, zero range); OSError
        EOPNOTSUPP where the filesystem has no such operation."""
        with self._io() as fd:
            if (
                _libc is None
                or _libc.fallocate(fd, mode, ctypes.c_long(offset), ctypes.c_long(length)) != 0
            ):
                err = ctypes.get_errno() if _libc is not None else errno.EOPNOTSUPP
                raise OSError(err, os.strerror(err))

    def seek_extents(self, offset: int, end: int) -> list[tuple[int, bool]]:
        """(length, is_data) runs from ``offset`` up to ``end`` (SEEK_DATA/HOLE);
        stops after the first few runs, as QEMU's file-posix asks one at a time."""
        runs: list[tuple[int, bool]] = []
        with self._io() as fd:
            position = offset
            while position < end and len(runs) < 64:
                try:
                    data = os.lseek(fd, position, os.SEEK_DATA)
                except OSError as err:
                    if err.errno == errno.ENXIO:  # only a hole up to the end of file
                        runs.append((end - position, False))
                        break
                    runs.append((end - position, True))  # no SEEK_DATA: all data
                    break
                if data > position:
                    runs.append((min(data, end) - position, False))
                    position = min(data, end)
                    continue
                hole = os.lseek(fd, position, os.SEEK_HOLE)
                hole = min(hole, end)
                runs.append((hole - position, True))
                position = hole
        return [run for run in runs if run[0] > 0]

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
            self._quiesce()
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
            self._quiesce()
            if self._fd >= 0:
                os.close(self._fd)  # closing the description drops its OFD locks
                self._fd = -1

    @property
    def closed(self) -> bool:
        return self._fd < 0


class NodeRegionIO:
    """The LUKS engine's ImageIO over a node's data path, from ``base`` on.

    ``limit`` bounds the region (a LUKS header inside qcow2 must stay within
    the clusters the FDE extension gives it); reads past the limit return
    short and writes past it are refused with QEMU's text.
    """

    def __init__(
        self, node: "FileBlockNode | Any", base: int = 0, limit: int | None = None
    ) -> None:
        self.node = node
        self.base = base
        self.limit = limit

    def size(self) -> int:
        size = max(0, self.node.size() - self.base)
        return size if self.limit is None else min(size, self.limit)

    def read(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size() - offset))
        return self.node.pread(self.base + offset, length)

    def write(self, offset: int, data: bytes) -> None:
        if self.limit is not None and offset + len(data) > self.limit:
            raise QMPError.generic("Request for data outside of extension header")
        self.node.pwrite(self.base + offset, data)

    def sync(self) -> None:
        self.node.flush()


class FileBlockNode(Node):
    """A ``file`` node: the graph's view of an open image file."""

    driver = "file"
    holds_locks = True
    inline_block_status = True
    inline_reads = True
    reopen_mutable = frozenset({"x-check-cache-dropped"})

    def __init__(self, name: str, handle: FileNode, *, implicit: bool, options: dict) -> None:
        super().__init__(name, implicit=implicit, read_only=handle.read_only, options=options)
        self.handle = handle

    # -- locks -----------------------------------------------------------------
    def check_locks(self, perm: Perm, shared: Perm) -> None:
        self.handle.check_perm(perm, shared)

    def update_locks(self, perm: Perm, shared: Perm) -> None:
        self.handle.set_perm(perm, shared)

    def close(self) -> None:
        self.handle.close()

    # -- what format drivers and the engine use -----------------------------------
    def size(self) -> int:
        """The file's real size in bytes."""
        return self.handle.size()

    def truncate(self, size: int) -> None:
        self.handle.truncate(size)

    def preallocate(self, start: int, end: int, mode: str) -> None:
        with self.handle._io() as fd:
            preallocate(fd, start, end, mode)

    # -- the data path ----------------------------------------------------------
    def length(self) -> int:
        return -(-self.handle.size() // 512) * 512

    def pread(self, offset: int, length: int) -> bytes:
        data = self.handle.pread(offset, length)
        if len(data) < length:  # the sector-rounded tail, or past EOF
            data += bytes(length - len(data))
        return data

    def pwrite(
        self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False
    ) -> None:
        try:
            self.handle.pwrite(offset, data)
        except QMPError:
            raise OSError(errno.EPERM, "read-only") from None
        if fua:
            self.handle.flush()

    def flush(self) -> None:
        self.handle.flush()

    def pwrite_zeroes(
        self,
        offset: int,
        length: int,
        *,
        may_unmap: bool = False,
        fua: bool = False,
        fast: bool = False,
    ) -> None:
        """As file-posix: punch a hole when unmapping is allowed, else zero
        the range in place; write zeroes only where neither exists."""
        if self.read_only:
            raise OSError(errno.EPERM, "read-only")
        size = self.handle.size()
        modes = [FALLOC_FL_ZERO_RANGE]
        if may_unmap and self.handle.options.discard == "unmap":
            modes.insert(0, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
        inside = max(0, min(length, size - offset))
        done = False
        if inside:
            for mode in modes:
                try:
                    self.handle.fallocate(mode, offset, inside)
                    done = True
                    break
                except OSError as err:
                    if err.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                        raise
        else:
            done = True
        if not done:
            if fast:
                raise OSError(errno.ENOTSUP, "no fast zeroes here")
            super().pwrite_zeroes(offset, inside)
        if length > inside:  # past the end of the file: grow it with a hole
            self.handle.truncate(offset + length)
        if fua:
            self.handle.flush()

    def pdiscard(self, offset: int, length: int) -> None:
        """Punch a hole with discard=unmap; ignored with discard=ignore (QEMU's default)."""
        if self.handle.options.discard != "unmap" or self.read_only:
            return
        try:
            self.handle.fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise

    def block_status(self, offset: int, length: int) -> list[Extent]:
        size = self.handle.size()
        end = offset + length
        extents: list[Extent] = []
        if offset < size:
            for run, is_data in self.handle.seek_extents(offset, min(end, size)):
                extents.append(Extent(run, data=is_data, zero=not is_data))
        if end > size:  # the rounded tail reads as zeroes
            extents.append(Extent(end - max(offset, size), data=False, zero=True))
        return extents

    def resize(self, size: int) -> None:
        """As file-posix: the file is truncated to the new size (shrinking too)."""
        try:
            self.handle.truncate(size)
        except OSError as err:
            raise ResizeError(err.errno or errno.EIO, "Could not resize file") from None

    # -- queries -----------------------------------------------------------------
    def filename(self) -> str:
        return self.options["filename"]

    def image_info(self) -> dict:
        try:
            size, actual = self.length(), self.handle.allocated_size()
        except (OSError, ValueError):
            size = actual = 0
        return {
            "filename": self.filename(),
            "format": "file",
            "actual-size": actual,
            "dirty-flag": False,
            "virtual-size": size,
        }


async def open_file(
    graph: "BlockGraph", options: dict, name: str | None, implicit: bool, flags: OpenFlags
) -> Node:
    file_opts = FileOptions.from_qapi(
        {
            **options,
            "read-only": flags.read_only,
            "auto-read-only": flags.auto_read_only,
            "cache": flags.cache,
        }
    )
    handle = await in_thread(FileNode, file_opts)
    try:
        node_name = graph.claim_name(name, implicit)
    except BaseException:
        await in_thread(handle.close)
        raise
    node = FileBlockNode(
        node_name,
        handle,
        implicit=implicit,
        options={**options, "read-only": handle.read_only, "cache": flags.cache},
    )
    graph.register(node)
    return node


# -- blockdev-create driver=file (a worker thread) ------------------------------------


def preallocate(fd: int, start: int, end: int, mode: str) -> None:
    if end <= start or mode in ("off", "metadata"):
        return
    if mode == "falloc":
        os.posix_fallocate(fd, start, end - start)
    elif mode == "full":
        chunk = bytes(1 << 20)
        offset = start
        while offset < end:
            n = min(len(chunk), end - offset)
            os.pwrite(fd, chunk[:n], offset)
            offset += n


def create_file(options: dict) -> None:
    """As QEMU's raw_co_create: lock, truncate, size."""
    filename = options["filename"]
    size = options["size"]
    prealloc = options.get("preallocation", "off")
    try:
        fd = os.open(filename, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise QMPError.generic(
            f"Could not create '{filename}': {os.strerror(err.errno or errno.EIO)}"
        ) from None
    try:
        lock = ImageLock(fd, enabled=True)
        lock.update(Perm.WRITE | Perm.RESIZE, ALL & ~Perm.RESIZE)
        try:
            os.ftruncate(fd, 0)
            # file-posix's handle_aiocb_truncate, in its order: QEMU passes
            # the uint64 on as an off_t (2**64 - 1 is -1), a preallocating
            # "shrink" is refused, then the mode ("metadata" has no meaning
            # for a file), then the truncate itself.
            offset = size - (1 << 64) if size > INT64_MAX else size
            if offset < 0 and prealloc != "off":
                raise QMPError.generic("Cannot use preallocation for shrinking files")
            if prealloc == "metadata":
                raise QMPError.generic("Unsupported preallocation mode: metadata")
            if offset < 0:
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
            os.ftruncate(fd, size)
            preallocate(fd, 0, size, prealloc)
        except OSError as err:
            raise ResizeError(err.errno or errno.EIO, "Could not resize file") from None
    finally:
        os.close(fd)


async def create(graph: "BlockGraph", options: dict) -> None:
    await in_thread(create_file, options)


DRIVER = BlockDriver("file", open=open_file, create=create)
