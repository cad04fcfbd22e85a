"""object-add / object-del for QEMU's user-creatable objects (qom-type secret)."""

from __future__ import annotations

import trio

from qmpd import keyval
from qmpd.commands import CommandContext, handler
from qmpd.crypto.errors import CryptoError
from qmpd.crypto.secrets import id_wellformed, read_secret_file, wipe
from qmpd.errors import QMPError


def add_object(ctx: CommandContext, args: dict, file_contents: bytearray | None = None) -> None:
    """Create an object from validated ObjectOptions (also used by --object).

    ``file_contents`` is the secret file, read beforehand off the event loop.
    """
    object_id = args["id"]
    if not id_wellformed(object_id):
        raise QMPError.generic("Parameter 'id' expects an identifier")
    if "loaded" in args:  # deprecated read-only property, refused as QEMU 7.2 does
        raise QMPError.generic("Property 'secret.loaded' is not writable")
    if object_id in ctx.objects:
        raise QMPError.generic(
            f"attempt to add duplicate property '{object_id}' to object (type 'container')")
    qom_type = args["qom-type"]
    if qom_type != "secret":  # the schema's ObjectType only offers 'secret'
        raise QMPError.generic(f"Parameter 'qom-type' does not accept value '{qom_type}'")
    try:
        ctx.secrets.add(object_id, data=args.get("data"), file=args.get("file"),
                           format=args.get("format", "raw"), keyid=args.get("keyid"),
                           iv=args.get("iv"), file_contents=file_contents)
    except CryptoError as exc:
        raise QMPError.generic(str(exc)) from None
    ctx.objects[object_id] = qom_type


@handler("object-add")
async def object_add(ctx: CommandContext, args: dict) -> dict:
    contents = None
    if args.get("file") is not None and args.get("data") is None:
        # Reading a file may block (a FIFO, a slow disk): never on the event loop.
        try:
            contents = await trio.to_thread.run_sync(read_secret_file, args["file"])
        except CryptoError as exc:
            if (args["id"] in ctx.objects or not id_wellformed(args["id"])
                    or "loaded" in args):
                contents = None  # the id error comes first, as in QEMU
            else:
                raise QMPError.generic(str(exc)) from None
    try:
        add_object(ctx, args, contents)
    finally:
        wipe(contents)
    return {}


@handler("object-del")
async def object_del(ctx: CommandContext, args: dict) -> dict:
    object_id = args["id"]
    if object_id not in ctx.objects:
        raise QMPError.generic(f"object '{object_id}' not found")
    del ctx.objects[object_id]
    ctx.secrets.delete(object_id)
    return {}


async def object_from_cli(daemon, text: str) -> None:
    """``--object secret,id=...``: parsed, validated and created like object-add."""
    try:
        args = keyval.parse(text, implied_key="qom-type")
    except keyval.KeyvalError as exc:
        raise QMPError.generic(str(exc)) from None
    daemon.schema.validate_arguments("object-add", args)
    await object_add(daemon.context(None, "object-add"), args)
