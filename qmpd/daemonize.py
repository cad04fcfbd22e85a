"""--daemonize as qemu-storage-daemon does it (os_daemonize, os_setup_post).

Theory of operation
-------------------
The process forks before it starts anything. The *parent* waits on a pipe
for the outcome of the start-up and exits with it: 0 once the daemon's
monitors and exports accept connections and the pid file is written, 1
(after printing the daemon's error on its own stderr) otherwise — also if
the daemon dies before it says anything. The *child* makes a new session
(setsid) and forks again, so that the daemon is no session leader and can
never acquire a controlling terminal; the grandchild is the daemon. As in
qsd its umask is 027 and SIGTSTP, SIGTTOU and SIGTTIN are ignored; once it
is ready it changes to ``/`` and puts /dev/null on stdin, stdout and
stderr — stderr stays open when logging was asked for (``--log-level``),
as qsd keeps it when it logs.

Without --daemonize, :class:`Foreground` reports the same two outcomes:
nothing when ready, the error on stderr when not.
"""

from __future__ import annotations

import os
import signal
import sys

_OK = b"\0"
_FAILED = b"\1"


class StartupReport:
    """Where the outcome of the start-up goes."""

    def ready(self) -> None:
        raise NotImplementedError

    def failed(self, text: str) -> None:
        raise NotImplementedError


class Foreground(StartupReport):
    def ready(self) -> None:
        pass

    def failed(self, text: str) -> None:
        print(text, file=sys.stderr)


class Detached(StartupReport):
    """The daemon's end of the pipe its first parent waits on."""

    def __init__(self, fd: int, *, keep_stderr: bool) -> None:
        self._fd: int | None = fd
        self._keep_stderr = keep_stderr

    def _send(self, data: bytes) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, data)
        except OSError:
            pass  # the parent is gone: nobody to tell
        finally:
            os.close(self._fd)
            self._fd = None

    def ready(self) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.chdir("/")
        null = os.open(os.devnull, os.O_RDWR)
        for target in (0, 1) if self._keep_stderr else (0, 1, 2):
            os.dup2(null, target)
        os.close(null)
        self._send(_OK)

    def failed(self, text: str) -> None:
        self._send(_FAILED + text.encode(errors="replace") + b"\n")


def daemonize(*, keep_stderr: bool) -> Detached:
    """Fork twice; only the daemon returns. The first process exits with the outcome."""
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()  # both close-on-exec
    pid = os.fork()
    if pid > 0:
        os.close(write_end)
        os._exit(_wait_for_daemon(read_end, pid))
    os.close(read_end)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.umask(0o027)
    for sig in (signal.SIGTSTP, signal.SIGTTOU, signal.SIGTTIN):
        signal.signal(sig, signal.SIG_IGN)
    return Detached(write_end, keep_stderr=keep_stderr)


def _wait_for_daemon(read_end: int, child: int) -> int:
    """The first parent: 0 when the daemon is ready, else its error printed and 1."""
    data = b""
    while True:
        try:
            chunk = os.read(read_end, 65536)
        except InterruptedError:  # pragma: no cover - PEP 475 retries
            continue
        if not chunk:
            break
        data += chunk
        if data[:1] == _OK:
            break
    try:
        os.waitpid(child, 0)  # the middle process exits at once
    except ChildProcessError:  # pragma: no cover
        pass
    if data[:1] == _OK:
        return 0
    text = data[1:] if data[:1] == _FAILED else b""
    if not text:
        text = b"qmpd: the daemon exited during start-up without saying why\n"
    os.write(2, text)
    return 1
