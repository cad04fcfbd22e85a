"""The job-* handlers: bound to schema/job.json, thin over the JobManager."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio
import trio.testing

from qmpd.commands import CommandContext, load_handlers
from qmpd.jobs.manager import Job, JobManager
from qmpd.errors import QMPError

SCHEMA = Path(__file__).resolve().parents[2] / "schema" / "job.json"
JOB_COMMANDS = {"query-jobs", "job-pause", "job-resume", "job-cancel",
                "job-complete", "job-dismiss", "job-finalize"}


def test_every_job_command_of_the_schema_has_a_handler():
    declared = {entry["command"] for entry in json.loads(SCHEMA.read_text()) if "command" in entry}
    assert declared == JOB_COMMANDS
    handlers = load_handlers()
    assert JOB_COMMANDS <= handlers.keys()
    assert all(handlers[name].__module__ == "qmpd.commands.jobs" for name in JOB_COMMANDS)


@pytest.fixture
async def call(nursery):
    events: list[tuple[str, dict]] = []
    manager = JobManager(lambda name, data: events.append((name, data)))
    await nursery.start(manager.run)
    handlers = load_handlers()

    async def call(command: str, args: dict | None = None):
        ctx = CommandContext(nodes=None, jobs=manager, objects={}, secrets=None, schema=None,
                             exports=None, session=None, command=command,
                             request_shutdown=lambda reason: None, version_info=dict)
        return await handlers[command](ctx, args or {})

    call.manager = manager
    call.events = events
    return call


async def test_query_jobs_and_dismiss_through_handlers(call):
    async def body(job: Job) -> None:
        job.set_progress(1, 1)

    call.manager.start("j0", "amend", body)
    await trio.testing.wait_all_tasks_blocked()
    assert await call("query-jobs") == [{"id": "j0", "type": "amend", "status": "concluded",
                                         "current-progress": 1, "total-progress": 1}]
    assert await call("job-dismiss", {"id": "j0"}) == {}
    assert await call("query-jobs") == []
    assert call.events[-1] == ("JOB_STATUS_CHANGE", {"id": "j0", "status": "null"})


async def test_pause_resume_cancel_through_handlers(call):
    gate = trio.Event()

    async def body(job: Job) -> None:
        await gate.wait()

    call.manager.start("j0", "create", body)
    assert await call("job-pause", {"id": "j0"}) == {}
    assert await call("job-resume", {"id": "j0"}) == {}
    assert await call("job-cancel", {"id": "j0"}) == {}
    await trio.testing.wait_all_tasks_blocked()
    assert (await call("query-jobs"))[0]["error"] == "Operation canceled"


@pytest.mark.parametrize("command,desc", [
    ("job-complete", "Job 'j0' in state 'concluded' cannot accept command verb 'complete'"),
    ("job-finalize", "Job 'j0' in state 'concluded' cannot accept command verb 'finalize'"),
    ("job-cancel", "Job 'j0' in state 'concluded' cannot accept command verb 'cancel'"),
    ("job-pause", "Job 'j0' in state 'concluded' cannot accept command verb 'pause'"),
    ("job-resume", "Can't resume a job that was not paused"),
])
async def test_handler_errors_are_qemus(call, command, desc):
    async def body(job: Job) -> None:
        pass

    call.manager.start("j0", "create", body)
    await trio.testing.wait_all_tasks_blocked()
    with pytest.raises(QMPError) as info:
        await call(command, {"id": "j0"})
    assert info.value.to_reply() == {"class": "GenericError", "desc": desc}


@pytest.mark.parametrize("command", sorted(JOB_COMMANDS - {"query-jobs"}))
async def test_unknown_job_is_a_generic_error(call, command):
    with pytest.raises(QMPError) as info:
        await call(command, {"id": "missing"})
    assert info.value.to_reply() == {"class": "GenericError", "desc": "Job not found"}
