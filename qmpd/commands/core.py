"""Protocol-level commands: negotiation, version, introspection, quit."""

from __future__ import annotations

from qmpd.commands import CommandContext, handler
from qmpd.errors import QMPError


@handler("qmp_capabilities")
async def qmp_capabilities(ctx: CommandContext, args: dict) -> dict:
    if ctx.session is None:
        raise QMPError.generic("qmp_capabilities needs a QMP session")
    ctx.session.negotiate(args.get("enable", []))
    return {}


@handler("query-version")
async def query_version(ctx: CommandContext, args: dict) -> dict:
    return ctx.version_info()


@handler("query-commands")
async def query_commands(ctx: CommandContext, args: dict) -> list:
    # QEMU lists the most recently registered command first.
    return [{"name": name} for name in reversed(list(ctx.schema.commands))]


@handler("query-qmp-schema")
async def query_qmp_schema(ctx: CommandContext, args: dict) -> list:
    return ctx.schema.introspect()


@handler("quit")
async def quit_(ctx: CommandContext, args: dict) -> dict:
    ctx.request_shutdown("host-qmp-quit")
    return {}
