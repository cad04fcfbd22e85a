"""QMP handlers of QEMU's job-* commands and query-jobs (qapi/job.json).

Thin: arguments arrive validated against schema/job.json; every rule and
error text lives in :mod:`qmpd.jobs`.
"""

from __future__ import annotations

from qmpd.commands import CommandContext, handler


@handler("query-jobs")
async def query_jobs(ctx: CommandContext, args: dict) -> list[dict]:
    return ctx.jobs.query()


def _verb(name: str):
    """job-<name> {id}: the JobManager method of the same name."""

    async def run(ctx: CommandContext, args: dict) -> dict:
        await getattr(ctx.jobs, name)(args["id"])
        return {}

    run.__name__ = f"job_{name}"
    return run


for _name in ("cancel", "pause", "resume", "complete", "finalize", "dismiss"):
    handler(f"job-{_name}")(_verb(_name))
