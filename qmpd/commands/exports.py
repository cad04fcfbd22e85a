"""NBD server and block export commands: thin handlers over the export registry."""

from __future__ import annotations

from qmpd.commands import CommandContext, handler


def flat_address(addr: dict) -> dict:
    """SocketAddressLegacy ({"type", "data": {...}}) to the flat SocketAddress."""
    return {"type": addr["type"], **addr["data"]}


@handler("nbd-server-start")
async def nbd_server_start(ctx: CommandContext, args: dict) -> dict:
    await ctx.exports.start_server(
        flat_address(args["addr"]),
        tls_creds=args.get("tls-creds"),
        tls_authz=args.get("tls-authz"),
        max_connections=args.get("max-connections", 100),
        monitor=True,
    )
    return {}


@handler("nbd-server-stop")
async def nbd_server_stop(ctx: CommandContext, args: dict) -> dict:
    await ctx.exports.stop_server()
    return {}


@handler("block-export-add")
async def block_export_add(ctx: CommandContext, args: dict) -> dict:
    await ctx.exports.add(args)
    return {}


@handler("block-export-del")
async def block_export_del(ctx: CommandContext, args: dict) -> dict:
    await ctx.exports.delete(args["id"], args.get("mode", "safe"))
    return {}


@handler("nbd-server-add")
async def nbd_server_add(ctx: CommandContext, args: dict) -> dict:
    await ctx.exports.add_legacy(args)
    return {}


@handler("nbd-server-remove")
async def nbd_server_remove(ctx: CommandContext, args: dict) -> dict:
    await ctx.exports.delete(args["name"], args.get("mode", "safe"))
    return {}


@handler("query-block-exports")
async def query_block_exports(ctx: CommandContext, args: dict) -> list:
    return ctx.exports.query()
