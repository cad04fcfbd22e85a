"""Block commands: thin handlers over the block graph and the job runner."""

from __future__ import annotations

from qmpd.commands import CommandContext, handler


@handler("blockdev-add")
async def blockdev_add(ctx: CommandContext, args: dict) -> dict:
    await ctx.daemon.nodes.add(args)
    return {}


@handler("blockdev-del")
async def blockdev_del(ctx: CommandContext, args: dict) -> dict:
    await ctx.daemon.nodes.delete(args["node-name"])
    return {}


@handler("blockdev-reopen")
async def blockdev_reopen(ctx: CommandContext, args: dict) -> dict:
    await ctx.daemon.nodes.reopen(args["options"])
    return {}


@handler("query-named-block-nodes")
async def query_named_block_nodes(ctx: CommandContext, args: dict) -> list:
    return ctx.daemon.nodes.query_named_block_nodes(args.get("flat", False))


@handler("blockdev-create")
async def blockdev_create(ctx: CommandContext, args: dict) -> dict:
    options = args["options"]
    nodes = ctx.daemon.nodes

    async def body(job) -> None:
        await nodes.create(options, job.progress)

    ctx.daemon.jobs.start(args["job-id"], "create", body)
    return {}


@handler("blockdev-amend", "x-blockdev-amend")
async def blockdev_amend(ctx: CommandContext, args: dict) -> dict:
    """QEMU checks the node, the driver and the permissions before the job exists."""
    nodes = ctx.daemon.nodes
    job_id, node_name, options = args["job-id"], args["node-name"], args["options"]
    force = args.get("force", False)
    command = ctx.command
    nodes.amend_precheck(node_name, options, command)
    ctx.daemon.jobs.check_new_id(job_id)
    await nodes.amend_check_permissions(node_name, options, command)

    async def body(job) -> None:
        await nodes.amend(node_name, options, force, job.progress, command)

    ctx.daemon.jobs.start(job_id, "amend", body)
    return {}
