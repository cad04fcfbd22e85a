"""QMP handlers of QEMU's job-* commands and query-jobs (qapi/job.json).

Thin: arguments arrive validated against schema/jobs.json; every rule and
error text lives in :mod:`qmpd.jobs`.
"""

from __future__ import annotations

from qmpd.commands import CommandContext, handler


@handler("query-jobs")
async def query_jobs(ctx: CommandContext, args: dict) -> list[dict]:
    return ctx.daemon.jobs.query()


@handler("job-cancel")
async def job_cancel(ctx: CommandContext, args: dict) -> dict:
    await ctx.daemon.jobs.cancel(args["id"])
    return {}


@handler("job-pause")
async def job_pause(ctx: CommandContext, args: dict) -> dict:
    await ctx.daemon.jobs.pause(args["id"])
    return {}


@handler("job-resume")
async def job_resume(ctx: CommandContext, args: dict) -> dict:
    await ctx.daemon.jobs.resume(args["id"])
    return {}


@handler("job-complete")
async def job_complete(ctx: CommandContext, args: dict) -> dict:
    await ctx.daemon.jobs.complete(args["id"])
    return {}


@handler("job-finalize")
async def job_finalize(ctx: CommandContext, args: dict) -> dict:
    await ctx.daemon.jobs.finalize(args["id"])
    return {}


@handler("job-dismiss")
async def job_dismiss(ctx: CommandContext, args: dict) -> dict:
    await ctx.daemon.jobs.dismiss(args["id"])
    return {}
