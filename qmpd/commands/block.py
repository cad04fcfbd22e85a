"""Block commands: thin handlers over the block verbs and the job runner."""

from __future__ import annotations

import trio

from qmpd.block import amend, blockdev, create, query, resize
from qmpd.commands import CommandContext, handler


@handler("blockdev-add")
async def blockdev_add(ctx: CommandContext, args: dict) -> dict:
    await blockdev.add(ctx.nodes, args)
    return {}


@handler("blockdev-del")
async def blockdev_del(ctx: CommandContext, args: dict) -> dict:
    await blockdev.delete(ctx.nodes, args["node-name"])
    return {}


@handler("blockdev-reopen")
async def blockdev_reopen(ctx: CommandContext, args: dict) -> dict:
    await blockdev.reopen(ctx.nodes, args["options"])
    return {}


@handler("query-named-block-nodes")
async def query_named_block_nodes(ctx: CommandContext, args: dict) -> list:
    # Sizes come from fstat() of every image: file I/O stays off the event loop.
    return await trio.to_thread.run_sync(
        query.named_block_nodes, ctx.nodes, args.get("flat", False)
    )


@handler("block_resize")
async def block_resize(ctx: CommandContext, args: dict) -> dict:
    await resize.run(ctx.nodes, args.get("device"), args.get("node-name"), args["size"])
    return {}


def _progress_like_qemu(work):
    """QEMU's create and amend jobs report 0/1, then 1/1 whatever the outcome."""

    async def body(job) -> None:
        job.progress.set(0, 1)
        try:
            await work(job.progress)
        finally:
            job.progress.set(1, 1)

    return body


@handler("blockdev-create")
async def blockdev_create(ctx: CommandContext, args: dict) -> dict:
    options, nodes = args["options"], ctx.nodes
    job = ctx.jobs.start(
        args["job-id"],
        "create",
        _progress_like_qemu(lambda progress: create.run(nodes, options, progress)),
    )
    await job.handed_off.wait()  # as qsd: the job runs until it first waits
    return {}


@handler("blockdev-amend", "x-blockdev-amend")
async def blockdev_amend(ctx: CommandContext, args: dict) -> dict:
    """As QEMU: node and driver checks, then the job is created, then the
    permission checks of the driver's pre_run; if those fail the job goes
    straight to 'null' and the command fails."""
    nodes, jobs = ctx.nodes, ctx.jobs
    job_id, node_name, options = args["job-id"], args["node-name"], args["options"]
    force = args.get("force", False)
    command = ctx.command
    node = amend.precheck(nodes, node_name, options, command)
    job = jobs.create(job_id, "amend")
    # The job holds the node until it is dismissed (QEMU's bdrv_ref): until
    # then blockdev-del refuses it, though its permissions are long released.
    node.job_refs += 1
    job.on_dismiss.append(lambda: setattr(node, "job_refs", node.job_refs - 1))
    try:
        await amend.check_permissions(nodes, node_name, options, command)
    except BaseException:
        jobs.early_fail(job)
        raise
    jobs.begin(
        job,
        _progress_like_qemu(
            lambda progress: amend.run(nodes, node_name, options, force, progress, command)
        ),
    )
    await job.handed_off.wait()  # as qsd: the job runs until it first waits
    return {}
