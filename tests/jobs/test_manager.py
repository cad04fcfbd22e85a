"""The job runner: QEMU's event order, query-jobs, verbs, cancel, pause, shutdown.

The expected sequences and texts are those qemu-storage-daemon 7.2 shows for
x-blockdev-amend and blockdev-create jobs (recorded against qsd; see
test_qsd_interop.py for the live comparison).
"""

from __future__ import annotations

import errno
import logging
import threading

import pytest
import trio
import trio.testing

from qmpd.crypto.errors import CryptoError
from qmpd.jobs.manager import OPERATION_CANCELED, Job, JobManager
from qmpd.errors import QMPError

SUCCESS = ["created", "running", "waiting", "pending", "concluded"]
FAILURE = ["created", "running", "aborting", "concluded"]


class Events(list):
    """A fake emit_event that records (event name, data)."""

    def __call__(self, name: str, data: dict) -> None:
        self.append((name, dict(data)))

    def statuses(self, job_id: str) -> list[str]:
        assert all(name == "JOB_STATUS_CHANGE" for name, _ in self)
        return [data["status"] for _, data in self if data["id"] == job_id]


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
async def jobs(nursery, events) -> JobManager:
    manager = JobManager(events)
    await nursery.start(manager.run)
    return manager


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


async def finished_body(job: Job) -> None:
    job.set_progress(0, 1)
    await trio.lowlevel.checkpoint()
    job.set_progress(1, 1)


def gated_body(gate: trio.Event, log: list[str]):
    """A body that waits for ``gate`` and writes what happened to ``log``."""

    async def body(job: Job) -> None:
        job.set_progress(0, 1)
        try:
            await gate.wait()
        except trio.Cancelled:
            log.append("cancelled")
            raise
        log.append("done")
        job.set_progress(1, 1)

    return body


async def expect_error(coro, desc: str, error_class: str = "GenericError") -> None:
    with pytest.raises(QMPError) as info:
        await coro
    assert (info.value.error_class, info.value.desc) == (error_class, desc)


# -- the normal lives of a job -------------------------------------------------------

async def test_success_event_order_query_and_dismiss(jobs, events):
    job = jobs.start("j0", "amend", finished_body)
    # created and running are emitted inside the command, before its reply
    assert events.statuses("j0") == ["created", "running"]
    assert job.status == "running"
    await settle()
    assert events.statuses("j0") == SUCCESS
    assert jobs.query() == [{"id": "j0", "type": "amend", "status": "concluded",
                             "current-progress": 1, "total-progress": 1}]
    await jobs.dismiss("j0")
    assert events.statuses("j0") == SUCCESS + ["null"]
    assert jobs.query() == []
    await expect_error(jobs.dismiss("j0"), "Job not found")
    with pytest.raises(QMPError, match="Job not found"):
        jobs.get("j0")


async def test_all_events_are_job_status_change_with_id_and_status(jobs, events):
    jobs.start("j0", "create", finished_body)
    await settle()
    assert events[0] == ("JOB_STATUS_CHANGE", {"id": "j0", "status": "created"})
    assert {name for name, _ in events} == {"JOB_STATUS_CHANGE"}
    assert all(set(data) == {"id", "status"} for _, data in events)


@pytest.mark.parametrize("exc,text", [
    (QMPError("GenericError", "Refusing to overwrite active keyslot 0 - please erase it first"),
     "Refusing to overwrite active keyslot 0 - please erase it first"),
    (CryptoError("Given keyslot 5 is already erased (inactive) "),
     "Given keyslot 5 is already erased (inactive) "),
    (OSError(errno.ENOSPC, "whatever"), "No space left on device"),
    (ExceptionGroup("nursery", [QMPError("GenericError", "inner text")]), "inner text"),
])
async def test_failure_event_order_and_error_text(jobs, events, exc, text):
    async def body(job: Job) -> None:
        job.set_progress(0, 1)
        await trio.lowlevel.checkpoint()
        raise exc

    jobs.start("j1", "amend", body)
    await settle()
    assert events.statuses("j1") == FAILURE
    assert jobs.query() == [{"id": "j1", "type": "amend", "status": "concluded",
                             "current-progress": 0, "total-progress": 1, "error": text}]


async def test_unexpected_exception_never_shows_its_message(jobs, events, caplog):
    async def body(job: Job) -> None:
        raise ValueError("hunter2-secret")

    with caplog.at_level(logging.DEBUG):
        jobs.start("j2", "create", body)
        await settle()
    assert events.statuses("j2") == FAILURE
    error = jobs.query()[0]["error"]
    assert "hunter2" not in error and "ValueError" in error
    assert "hunter2" not in caplog.text
    assert "ValueError" in caplog.text


async def test_query_lists_newest_first_with_exact_shape(jobs):
    gate = trio.Event()
    jobs.start("a", "create", gated_body(gate, []))
    jobs.start("b", "amend", gated_body(gate, []))
    await settle()
    infos = jobs.query()
    assert [i["id"] for i in infos] == ["b", "a"]
    assert infos[0] == {"id": "b", "type": "amend", "status": "running",
                        "current-progress": 0, "total-progress": 1}
    gate.set()
    await settle()
    assert [i["status"] for i in jobs.query()] == ["concluded", "concluded"]


async def test_progress_reports_through_the_progress_protocol(jobs):
    seen = trio.Event()

    async def body(job: Job) -> None:
        job.progress.set(3, 8)
        await seen.wait()

    jobs.start("p", "create", body)
    await settle()
    assert (jobs.query()[0]["current-progress"], jobs.query()[0]["total-progress"]) == (3, 8)
    seen.set()


# -- ids ------------------------------------------------------------------------------

async def test_job_ids_are_checked_like_qemu(jobs):
    with pytest.raises(QMPError, match=r"^Invalid job ID '0bad'$"):
        jobs.start("0bad", "amend", finished_body)
    with pytest.raises(QMPError, match=r"^Invalid job ID ''$"):
        jobs.start("", "amend", finished_body)
    jobs.start("j0", "amend", finished_body)
    await settle()
    with pytest.raises(QMPError, match=r"^Job ID 'j0' already in use$"):
        jobs.start("j0", "create", finished_body)
    await jobs.dismiss("j0")
    jobs.start("j0", "create", finished_body)  # free again once dismissed


async def test_verbs_on_unknown_job(jobs):
    for verb in (jobs.cancel, jobs.pause, jobs.resume, jobs.complete, jobs.finalize, jobs.dismiss):
        await expect_error(verb("nope"), "Job not found")


# -- verbs a create/amend job refuses ---------------------------------------------------

async def test_verbs_on_a_concluded_job_are_refused_as_in_qsd(jobs):
    jobs.start("j0", "amend", finished_body)
    await settle()
    for name, verb in (("pause", jobs.pause), ("complete", jobs.complete),
                       ("finalize", jobs.finalize), ("cancel", jobs.cancel)):
        await expect_error(
            verb("j0"), f"Job 'j0' in state 'concluded' cannot accept command verb '{name}'")
    # resume checks "was it paused" before the verb table
    await expect_error(jobs.resume("j0"), "Can't resume a job that was not paused")


async def test_complete_and_dismiss_refused_while_running(jobs):
    gate = trio.Event()
    jobs.start("j0", "create", gated_body(gate, []))
    await expect_error(jobs.complete("j0"),
                       "Job 'j0' in state 'running' cannot accept command verb 'complete'")
    await expect_error(jobs.dismiss("j0"),
                       "Job 'j0' in state 'running' cannot accept command verb 'dismiss'")
    await expect_error(jobs.finalize("j0"),
                       "Job 'j0' in state 'running' cannot accept command verb 'finalize'")
    gate.set()


# -- cancel -----------------------------------------------------------------------------

async def test_cancel_running_job(jobs, events):
    gate, log = trio.Event(), []
    jobs.start("j0", "amend", gated_body(gate, log))
    await settle()
    await jobs.cancel("j0")
    await settle()
    assert log == ["cancelled"]
    assert events.statuses("j0") == FAILURE
    info = jobs.query()[0]
    assert (info["status"], info["error"]) == ("concluded", OPERATION_CANCELED)
    assert OPERATION_CANCELED == "Operation canceled"


async def test_cancel_before_the_body_first_runs(jobs, events):
    log = []
    jobs.start("j0", "amend", gated_body(trio.Event(), log))
    await jobs.cancel("j0")  # same tick as the start: the task has not run yet
    await settle()
    assert log == ["cancelled"]
    assert events.statuses("j0") == FAILURE


async def test_cancelled_job_whose_shielded_work_completes_still_reports_canceled(jobs, events):
    """As QEMU: a create/amend job cannot stop mid-way; it ends 'Operation canceled'."""
    started, gate, log = trio.Event(), trio.Event(), []

    async def body(job: Job) -> None:
        with trio.CancelScope(shield=True):
            started.set()
            await gate.wait()
            log.append("update written")
            assert job.cancel_requested

    jobs.start("j0", "amend", body)
    await started.wait()
    await jobs.cancel("j0")
    await settle()
    assert events.statuses("j0") == ["created", "running"]  # still working
    gate.set()
    await settle()
    assert log == ["update written"]
    assert events.statuses("j0") == FAILURE
    assert jobs.query()[0]["error"] == "Operation canceled"


async def test_failure_text_wins_over_cancellation(jobs):
    started, gate = trio.Event(), trio.Event()

    async def body(job: Job) -> None:
        with trio.CancelScope(shield=True):
            started.set()
            await gate.wait()
            raise QMPError("GenericError", "the real reason")

    jobs.start("j0", "amend", body)
    await started.wait()
    await jobs.cancel("j0")
    gate.set()
    await settle()
    assert jobs.query()[0]["error"] == "the real reason"


# -- pause / resume ---------------------------------------------------------------------

async def test_pause_without_pause_point_keeps_running_as_in_qsd(jobs, events):
    gate = trio.Event()
    jobs.start("c4", "create", gated_body(gate, []))
    await jobs.pause("c4")
    await expect_error(jobs.pause("c4"), "Job is already paused")
    await settle()
    assert jobs.query()[0]["status"] == "running"
    gate.set()
    await settle()
    assert events.statuses("c4") == SUCCESS
    # still user-paused, so the verb table answers
    await expect_error(jobs.resume("c4"),
                       "Job 'c4' in state 'concluded' cannot accept command verb 'resume'")


async def test_pause_then_resume_without_pause_point(jobs, events):
    gate = trio.Event()
    jobs.start("c1", "create", gated_body(gate, []))
    await jobs.pause("c1")
    await jobs.resume("c1")
    await expect_error(jobs.resume("c1"), "Can't resume a job that was not paused")
    gate.set()
    await settle()
    assert events.statuses("c1") == SUCCESS


async def test_pause_then_cancel_without_pause_point_as_in_qsd(jobs, events):
    gate, log = trio.Event(), []
    jobs.start("c2", "create", gated_body(gate, log))
    await jobs.pause("c2")
    await jobs.cancel("c2")
    await settle()
    assert events.statuses("c2") == FAILURE
    assert jobs.query()[0]["error"] == "Operation canceled"
    # cancel dropped the user's pause
    await expect_error(jobs.resume("c2"), "Can't resume a job that was not paused")


def pausing_body(phase1_done: trio.Event, gate: trio.Event, log: list[str]):
    async def body(job: Job) -> None:
        await gate.wait()
        log.append("phase 1")
        phase1_done.set()
        try:
            await job.pause_point()
        except trio.Cancelled:
            log.append("cancelled at pause point")
            raise
        log.append("phase 2")

    return body


async def test_pause_point_shows_paused_and_resumes(jobs, events):
    phase1, gate, log = trio.Event(), trio.Event(), []
    jobs.start("j0", "amend", pausing_body(phase1, gate, log))
    await jobs.pause("j0")
    gate.set()
    await phase1.wait()
    await settle()
    assert jobs.query()[0]["status"] == "paused"
    assert log == ["phase 1"]
    await jobs.resume("j0")
    await settle()
    assert log == ["phase 1", "phase 2"]
    assert events.statuses("j0") == ["created", "running", "paused", "running",
                                     "waiting", "pending", "concluded"]


async def test_pause_point_counts_nothing_when_not_paused(jobs, events):
    phase1, gate, log = trio.Event(), trio.Event(), []
    gate.set()
    jobs.start("j0", "amend", pausing_body(phase1, gate, log))
    await settle()
    assert log == ["phase 1", "phase 2"]
    assert events.statuses("j0") == SUCCESS


async def test_cancel_while_paused_at_pause_point(jobs, events):
    phase1, gate, log = trio.Event(), trio.Event(), []
    jobs.start("j0", "amend", pausing_body(phase1, gate, log))
    await jobs.pause("j0")
    gate.set()
    await phase1.wait()
    await settle()
    await jobs.cancel("j0")
    await settle()
    assert log == ["phase 1", "cancelled at pause point"]
    # QEMU: the job leaves its pause point (running) before it aborts
    assert events.statuses("j0") == ["created", "running", "paused", "running",
                                     "aborting", "concluded"]


async def test_pause_refused_once_concluded(jobs):
    jobs.start("j0", "amend", finished_body)
    await settle()
    await expect_error(jobs.pause("j0"),
                       "Job 'j0' in state 'concluded' cannot accept command verb 'pause'")


# -- finalize / dismiss flags -------------------------------------------------------------

async def test_manual_finalize_waits_in_pending(jobs, events):
    jobs.start("j0", "create", finished_body, auto_finalize=False)
    await settle()
    assert events.statuses("j0") == ["created", "running", "waiting", "pending"]
    assert jobs.query()[0]["status"] == "pending"
    await expect_error(jobs.dismiss("j0"),
                       "Job 'j0' in state 'pending' cannot accept command verb 'dismiss'")
    await jobs.finalize("j0")
    assert events.statuses("j0") == SUCCESS
    await expect_error(jobs.finalize("j0"),
                       "Job 'j0' in state 'concluded' cannot accept command verb 'finalize'")


async def test_cancel_in_pending_aborts(jobs, events):
    jobs.start("j0", "create", finished_body, auto_finalize=False)
    await settle()
    await jobs.cancel("j0")
    assert events.statuses("j0") == ["created", "running", "waiting", "pending",
                                     "aborting", "concluded"]
    assert jobs.query()[0]["error"] == "Operation canceled"


async def test_auto_dismiss_removes_the_job(jobs, events):
    jobs.start("j0", "create", finished_body, auto_dismiss=True)
    await settle()
    assert events.statuses("j0") == SUCCESS + ["null"]
    assert jobs.query() == []


async def test_failed_job_with_auto_dismiss(jobs, events):
    async def body(job: Job) -> None:
        raise QMPError("GenericError", "nope")

    jobs.start("j0", "create", body, auto_dismiss=True)
    await settle()
    assert events.statuses("j0") == FAILURE + ["null"]


# -- concurrency ------------------------------------------------------------------------

async def test_worker_thread_body_does_not_block_the_loop(jobs, events):
    """The body waits in a thread for a flag only another trio task sets."""
    release = threading.Event()
    ticks = 0

    def computation() -> int:
        if not release.wait(timeout=10):
            raise AssertionError("the event loop never ran while the thread worked")
        return 42

    async def body(job: Job) -> None:
        result = await trio.to_thread.run_sync(computation)
        job.set_progress(result, result)

    async def other_task() -> None:
        nonlocal ticks
        for _ in range(5):
            ticks += 1
            await trio.sleep(0.001)
        release.set()

    with trio.fail_after(10):
        jobs.start("j0", "amend", body)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(other_task)
        while jobs.get("j0").status != "concluded":
            await trio.sleep(0.001)
    assert ticks == 5
    assert events.statuses("j0") == SUCCESS
    assert jobs.query()[0]["current-progress"] == 42


async def test_shutdown_cancels_running_jobs_newest_first_and_dismisses_all(events):
    manager = JobManager(events)
    order: list[str] = []
    critical_done = trio.Event()

    async def shielded(job: Job) -> None:
        with trio.CancelScope(shield=True):
            await trio.sleep(0.01)
            order.append(f"{job.id} finished its critical section")
            critical_done.set()

    async def waiting(job: Job) -> None:
        try:
            await trio.sleep_forever()
        finally:
            order.append(f"{job.id} cancelled")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(manager.run)
            manager.start("old", "create", finished_body)
            await settle()  # 'old' concluded, not dismissed
            manager.start("mid", "amend", shielded)
            manager.start("new", "amend", waiting)
            await settle()
            nursery.cancel_scope.cancel()  # the daemon stops
    assert critical_done.is_set()
    assert order == ["new cancelled", "mid finished its critical section"]
    assert events.statuses("new") == ["created", "running", "aborting", "concluded", "null"]
    assert events.statuses("mid") == ["created", "running", "aborting", "concluded", "null"]
    assert events.statuses("old") == SUCCESS + ["null"]
    # newest first, one job fully settled before the next
    assert [d["id"] for _, d in events if d["status"] == "null"] == ["new", "mid", "old"]
    assert manager.query() == []
    with pytest.raises(RuntimeError):
        manager.start("late", "amend", finished_body)


async def test_explicit_shutdown_then_run_cancelled(events):
    manager = JobManager(events)
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        gate, log = trio.Event(), []
        manager.start("j0", "amend", gated_body(gate, log))
        await settle()
        await manager.shutdown()
        assert log == ["cancelled"]
        assert manager.query() == []
        nursery.cancel_scope.cancel()
    assert events.statuses("j0") == FAILURE + ["null"]


async def test_start_needs_a_running_manager(events):
    manager = JobManager(events)
    with pytest.raises(RuntimeError):
        manager.start("j0", "amend", finished_body)
    assert events == []
