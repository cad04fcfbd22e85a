"""The job runner: QEMU's job life cycle on trio.

Theory of operation
-------------------
A job is a body (an async function doing the work, e.g. creating an image or
amending its key slots) wrapped in QEMU's life cycle, so that a client sees
the statuses, JOB_STATUS_CHANGE events and errors of qemu-storage-daemon 7.2:

    success:  created, running, waiting, pending, concluded [, null on dismiss]
    failure:  created, running, aborting, concluded          (query-jobs: error)
    cancel:   created, running, aborting, concluded          ("Operation canceled")

:meth:`JobManager.start` moves a new job to 'created' and 'running' at once,
as QEMU's job_create + job_start do inside the command, so those events
precede the command's reply. The body then runs in its own task in the
manager's nursery. When it ends, the bookkeeping (QEMU's job_completed,
job_finalize_single, job_conclude) runs synchronously in that task; there is
no await between 'waiting' and 'concluded', so transient statuses are never
seen by a concurrent command, exactly as in QEMU's main loop.

Cancellation. Each body runs inside its job's own *shielded* cancel scope.
job-cancel cancels that scope; the body shields whatever must not be torn
(an on-disk update) with an inner shielded scope. Cancellation from outside
(the daemon shutting down) cannot reach a body directly: :meth:`run` catches
it and calls :meth:`shutdown`, which cancels the jobs one at a time, newest
first, and waits for each, like QEMU's job_cancel_sync_all. Create and amend
jobs have no soft-cancel in QEMU (no driver .cancel), so every cancel is a
forced one: a cancelled job ends with the error "Operation canceled" even if
its body finished its work.

Pausing follows QEMU's counting: job-pause raises the pause count, job-resume
lowers it, cancel drops the user's pause. A job only shows 'paused' when its
body reaches :meth:`Job.pause_point`; QEMU's create and amend bodies have no
pause point after they start, so a paused create/amend job keeps 'running'
and concludes normally there, and job-resume afterwards is refused by the
verb table.
"""

from __future__ import annotations

import logging
import os
from typing import Awaitable, Callable

import trio

from qmpd import handoff
from qmpd.crypto.errors import CryptoError
from qmpd.errors import GENERIC_ERROR, QMPError, describe_bug
from qmpd.jobs import states

log = logging.getLogger(__name__)

#: glibc's strerror(ECANCELED): what QEMU reports for a cancelled job.
OPERATION_CANCELED = "Operation canceled"

EmitEvent = Callable[[str, dict], None]
JobBody = Callable[["Job"], Awaitable[None]]


class JobProgress:
    """Where a body reports progress (the block layer's Progress protocol).

    QEMU's query-jobs shows the pair as current-progress / total-progress;
    only their ratio means something.
    """

    __slots__ = ("current", "total")

    def __init__(self) -> None:
        self.current = 0
        self.total = 0

    def set(self, current: int, total: int) -> None:
        self.current = current
        self.total = total


class Job:
    """One job: its identity, status, progress and error, as query-jobs shows.

    Bodies use :attr:`progress` (or :meth:`set_progress`), may call
    :meth:`pause_point` between phases, and may read :attr:`cancel_requested`
    inside a shielded section. Everything else belongs to the manager.
    """

    def __init__(
        self,
        manager: "JobManager",
        job_id: str,
        job_type: str,
        *,
        auto_finalize: bool,
        auto_dismiss: bool,
    ) -> None:
        self.id = job_id
        self.type = job_type
        self.auto_finalize = auto_finalize
        self.auto_dismiss = auto_dismiss
        self.progress = JobProgress()
        #: The failure's text for query-jobs, once the job has failed.
        self.error: str | None = None
        self._manager = manager
        self._status = states.UNDEFINED
        self._pause_count = 0
        self._user_paused = False
        self._cancelled = False
        # The body has returned: QEMU's deferred_to_main_loop.
        self._body_done = False
        self._unpause = trio.Event()
        self._scope = trio.CancelScope(shield=True)
        #: Run when the job goes away ('null'): references it held to other
        #: objects end there, as QEMU's job_unref drops them.
        self.on_dismiss: list[Callable[[], None]] = []
        # Set once the job has concluded (or vanished): shutdown waits on it.
        self._concluded = trio.Event()
        #: Set when the body first waits for a thread, or ends (see qmpd.handoff).
        self.handed_off = trio.Event()

    def __repr__(self) -> str:
        return f"<Job {self.id!r} type={self.type} status={self._status}>"

    @property
    def status(self) -> str:
        return self._status

    @property
    def cancel_requested(self) -> bool:
        return self._cancelled

    def set_progress(self, current: int, total: int) -> None:
        self.progress.set(current, total)

    def info(self) -> dict:
        """The job as QAPI's JobInfo."""
        info = {
            "id": self.id,
            "type": self.type,
            "status": self._status,
            "current-progress": self.progress.current,
            "total-progress": self.progress.total,
        }
        if self.error is not None:
            info["error"] = self.error
        return info

    async def pause_point(self) -> None:
        """Stop here while the job is paused (QEMU's job_pause_point).

        Also a checkpoint: a cancelled job's body gets ``trio.Cancelled``
        here. While stopped the job shows 'paused' ('standby' if it was
        'ready') and returns to its former status before the body goes on.
        """
        await trio.lowlevel.checkpoint()
        if self._pause_count == 0 or self._cancelled:
            return
        resume_to = self._status
        self._manager._transition(
            self, states.STANDBY if resume_to == states.READY else states.PAUSED
        )
        try:
            while self._pause_count > 0 and not self._cancelled:
                self._unpause = trio.Event()
                await self._unpause.wait()
        finally:
            self._manager._transition(self, resume_to)
        # Woken by job-cancel: deliver it here unless the body is shielded.
        await trio.lowlevel.checkpoint_if_cancelled()

    def _wake(self) -> None:
        self._unpause.set()


class JobManager:
    """All jobs of the daemon, their tasks, and the job-* verbs."""

    def __init__(self, emit_event: EmitEvent) -> None:
        self._emit_event = emit_event
        # Newest first: QEMU inserts at the head, and query-jobs lists so.
        self._jobs: list[Job] = []
        self._nursery: trio.Nursery | None = None
        self._closing = False

    # -- life of the manager -------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Own the nursery the jobs run in, until cancelled; then shut down.

        Start it with ``await nursery.start(manager.run)``: :meth:`start`
        works once this has reported itself started.
        """
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                try:
                    await trio.sleep_forever()
                finally:
                    await self.shutdown()
        finally:
            self._nursery = None

    async def shutdown(self) -> None:
        """Cancel every job, newest first, and wait for each; dismiss them all.

        Shielded: a crash-safe on-disk update in a body is allowed to finish
        even when the daemon's own shutdown is being cancelled.
        """
        self._closing = True
        with trio.CancelScope(shield=True):
            while self._jobs:
                job = self._jobs[0]
                self._cancel(job)  # a concluded job is dismissed right away
                if job in self._jobs:
                    await job._concluded.wait()

    # -- creating and finding jobs ---------------------------------------------

    def start(
        self,
        job_id: str,
        job_type: str,
        body: JobBody,
        *,
        auto_finalize: bool = True,
        auto_dismiss: bool = False,
    ) -> Job:
        """Create a job and start its body in a new task (QEMU's job_create + job_start).

        Emits 'created' and 'running' before returning. Defaults are those of
        QEMU's create and amend jobs (JOB_DEFAULT | JOB_MANUAL_DISMISS).
        """
        job = self.create(job_id, job_type, auto_finalize=auto_finalize, auto_dismiss=auto_dismiss)
        self.begin(job, body)
        return job

    def create(
        self, job_id: str, job_type: str, *, auto_finalize: bool = True, auto_dismiss: bool = False
    ) -> Job:
        """QEMU's job_create alone: the job exists ('created') but does not run.

        A command that has checks to make between creating and starting its
        job (as x-blockdev-amend's pre_run) then calls :meth:`begin` or
        :meth:`early_fail`.
        """
        if self._nursery is None or self._closing:
            raise RuntimeError("the job manager is not running")
        if job_type not in states.JOB_TYPES:
            raise ValueError(f"unknown job type {job_type!r}")
        self.check_new_id(job_id)
        job = Job(self, job_id, job_type, auto_finalize=auto_finalize, auto_dismiss=auto_dismiss)
        self._transition(job, states.CREATED)
        self._jobs.insert(0, job)
        return job

    def begin(self, job: Job, body: JobBody) -> None:
        """QEMU's job_start: 'running', and the body runs in its own task."""
        if self._nursery is None or self._closing:
            self.early_fail(job)
            raise RuntimeError("the job manager is not running")
        self._transition(job, states.RUNNING)
        self._nursery.start_soon(self._run_job, job, body, name=f"job {job.id}")

    def early_fail(self, job: Job) -> None:
        """QEMU's job_early_fail: a created job that never ran goes away ('null')."""
        self._dismiss(job)

    def check_new_id(self, job_id: str) -> None:
        """QEMU's job_create checks of the id, for commands that must fail
        before doing anything else that job_create would come first to."""
        if not states.job_id_wellformed(job_id):
            raise QMPError(GENERIC_ERROR, f"Invalid job ID '{job_id}'")
        if self._find(job_id) is not None:
            raise QMPError(GENERIC_ERROR, f"Job ID '{job_id}' already in use")

    def get(self, job_id: str) -> Job:
        job = self._find(job_id)
        if job is None:
            raise QMPError(GENERIC_ERROR, "Job not found")
        return job

    def query(self) -> list[dict]:
        """query-jobs: a JobInfo per job, newest first."""
        return [job.info() for job in self._jobs]

    def _find(self, job_id: str) -> Job | None:
        for job in self._jobs:
            if job.id == job_id:
                return job
        return None

    # -- the verbs (job-cancel, job-pause, ...) ----------------------------------
    # Each checks the verb table first, then does what QEMU's job_user_* does.
    # None of them waits for the job: like QEMU they return once the request
    # is recorded.

    async def cancel(self, job_id: str) -> None:
        """job-cancel. QEMU's job-cancel has no 'force': it always forces."""
        job = self.get(job_id)
        states.check_verb(job.id, job.status, states.CANCEL)
        self._cancel(job)

    async def pause(self, job_id: str) -> None:
        job = self.get(job_id)
        states.check_verb(job.id, job.status, states.PAUSE)
        if job._user_paused:
            raise QMPError(GENERIC_ERROR, "Job is already paused")
        job._user_paused = True
        job._pause_count += 1

    async def resume(self, job_id: str) -> None:
        job = self.get(job_id)
        # QEMU checks this before the verb table.
        if not job._user_paused or job._pause_count <= 0:
            raise QMPError(GENERIC_ERROR, "Can't resume a job that was not paused")
        states.check_verb(job.id, job.status, states.RESUME)
        job._user_paused = False
        self._unpause(job)

    async def complete(self, job_id: str) -> None:
        """job-complete. Our job types have no completion step (no driver .complete)."""
        job = self.get(job_id)
        states.check_verb(job.id, job.status, states.COMPLETE)
        raise QMPError(GENERIC_ERROR, f"The active block job '{job.id}' cannot be completed")

    async def finalize(self, job_id: str) -> None:
        job = self.get(job_id)
        states.check_verb(job.id, job.status, states.FINALIZE)
        self._finalize(job)

    async def dismiss(self, job_id: str) -> None:
        job = self.get(job_id)
        states.check_verb(job.id, job.status, states.DISMISS)
        self._dismiss(job)

    # -- the machinery ------------------------------------------------------------

    def _transition(self, job: Job, new: str) -> None:
        old = job._status
        states.check_transition(job.id, old, new)
        job._status = new
        if new != old:
            log.debug("job %s: %s -> %s", job.id, old, new)
            self._emit_event("JOB_STATUS_CHANGE", {"id": job.id, "status": new})

    def _unpause(self, job: Job) -> None:
        job._pause_count -= 1
        if job._pause_count == 0:
            job._wake()

    async def _run_job(self, job: Job, body: JobBody) -> None:
        error: str | None = None
        try:
            with job._scope, handoff.reporting_to(job.handed_off.set):
                await body(job)
        except Exception as exc:  # noqa: BLE001 - every failure becomes the job's error
            error = _failure_text(job, exc)
        job._body_done = True
        self._completed(job, error)
        job.handed_off.set()

    def _cancel(self, job: Job) -> None:
        """QEMU's job_cancel with force: our job types cannot be soft-cancelled."""
        if job.status == states.CONCLUDED:
            self._dismiss(job)
            return
        if job._user_paused:
            job._user_paused = False
            self._unpause(job)
        job._cancelled = True
        if job._body_done:
            # Waiting or pending for finalization: abort it now.
            self._finalize(job)
        else:
            job._scope.cancel()
            job._wake()

    def _completed(self, job: Job, error: str | None) -> None:
        """The body has ended: fail the job, or take it through waiting and pending."""
        job.error = error
        if self._update_rc(job):
            self._finalize(job)
            return
        self._transition(job, states.WAITING)
        self._transition(job, states.PENDING)
        if job.auto_finalize:
            self._finalize(job)

    def _update_rc(self, job: Job) -> bool:
        """A cancelled job fails; a failed job goes to 'aborting'. True if failed."""
        if job.error is None and job._cancelled:
            job.error = OPERATION_CANCELED
        if job.error is None:
            return False
        self._transition(job, states.ABORTING)
        return True

    def _finalize(self, job: Job) -> None:
        """QEMU's job_finalize_single: settle the outcome, then conclude."""
        self._update_rc(job)
        self._transition(job, states.CONCLUDED)
        job._concluded.set()
        if job.auto_dismiss:
            self._dismiss(job)

    def _dismiss(self, job: Job) -> None:
        self._transition(job, states.NULL)
        self._jobs.remove(job)
        job._concluded.set()
        for release in job.on_dismiss:
            release()
        job.on_dismiss.clear()


def _failure_text(job: Job, exc: BaseException) -> str:
    """The error text query-jobs shows for a body's exception.

    Only texts that are made to be shown (QMPError, CryptoError, an errno)
    reach the client; anything else is a daemon bug and is logged by type and
    traceback only, since its message might hold a secret.
    """
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, QMPError):
        return exc.desc
    if isinstance(exc, CryptoError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno:
        # QEMU's fallback when a job returns -errno without a message.
        return os.strerror(exc.errno)
    log.error("job %s: body raised %s", job.id, describe_bug(exc))
    return f"Internal error in job '{job.id}' ({type(exc).__name__})"
