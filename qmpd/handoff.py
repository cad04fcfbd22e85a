"""When a job first waits: the moment QEMU's job coroutine yields.

qsd runs a new job's coroutine until its first yield before the command
that started it returns, so a job that fails on its options has emitted
'aborting' and 'concluded' before the reply. qmpd keeps that order by
letting the starter wait until the job body first hands work to a thread
(or ends): code that is about to wait calls :func:`notify`, and the job
runner sets who is told with :func:`reporting_to`.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator

_listener: ContextVar[Callable[[], None] | None] = ContextVar("qmpd_handoff", default=None)


def notify() -> None:
    """The current task is about to wait (a thread hand-off, a busy lock)."""
    listener = _listener.get()
    if listener is not None:
        listener()


@contextmanager
def reporting_to(listener: Callable[[], None]) -> Iterator[None]:
    token = _listener.set(listener)
    try:
        yield
    finally:
        _listener.reset(token)
