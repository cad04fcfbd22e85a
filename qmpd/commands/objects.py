"""object-add / object-del for QEMU's user-creatable objects (secret, tls-creds-*)."""

from __future__ import annotations

import trio

from qmpd import keyval
from qmpd.commands import CommandContext, handler
from qmpd.crypto.errors import CryptoError
from qmpd.crypto.secrets import id_wellformed, read_secret_file, wipe
from qmpd.errors import QMPError
from qmpd.exports.tls import TLS_TYPES, TlsCredsStore, make_creds


def add_object(
    ctx: CommandContext, args: dict, file_contents: bytearray | None = None, tls_creds=None
) -> None:
    """Create an object from validated ObjectOptions (also used by --object).

    ``file_contents`` is the secret file, read beforehand off the event loop.
    """
    object_id = args["id"]
    if not id_wellformed(object_id):
        raise QMPError.generic("Parameter 'id' expects an identifier")
    qom_type = args["qom-type"]
    if "loaded" in args:  # deprecated read-only property, refused as QEMU 7.2 does
        raise QMPError.generic(f"Property '{qom_type}.loaded' is not writable")
    if object_id in ctx.objects:
        raise QMPError.generic(
            f"attempt to add duplicate property '{object_id}' to object (type 'container')"
        )
    if qom_type in TLS_TYPES:
        # loaded at creation, as QEMU's complete(); object_add reads the files off the loop
        store = ctx.exports.tls_lookup
        assert isinstance(store, TlsCredsStore)  # the daemon's (qmpd.daemon)
        store.add(tls_creds or make_creds(args))
        ctx.objects[object_id] = qom_type
        return
    if qom_type != "secret":
        raise QMPError.generic(f"Parameter 'qom-type' does not accept value '{qom_type}'")
    try:
        ctx.secrets.add(
            object_id,
            data=args.get("data"),
            file=args.get("file"),
            format=args.get("format", "raw"),
            keyid=args.get("keyid"),
            iv=args.get("iv"),
            file_contents=file_contents,
        )
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
            if args["id"] in ctx.objects or not id_wellformed(args["id"]) or "loaded" in args:
                contents = None  # the id error comes first, as in QEMU
            else:
                raise QMPError.generic(str(exc)) from None
    creds = None
    if (
        args["qom-type"] in TLS_TYPES
        and id_wellformed(args["id"])
        and args["id"] not in ctx.objects
        and "loaded" not in args
    ):
        creds = await trio.to_thread.run_sync(make_creds, args)
    try:
        add_object(ctx, args, contents, creds)
    finally:
        wipe(contents)
    return {}


@handler("object-del")
async def object_del(ctx: CommandContext, args: dict) -> dict:
    object_id = args["id"]
    if object_id not in ctx.objects:
        raise QMPError.generic(f"object '{object_id}' not found")
    qom_type = ctx.objects.pop(object_id)
    if qom_type in TLS_TYPES:
        store = ctx.exports.tls_lookup
        assert isinstance(store, TlsCredsStore)  # the daemon's (qmpd.daemon)
        store.delete(object_id)  # a running server keeps its context
    else:
        ctx.secrets.delete(object_id)
    return {}


async def object_from_cli(daemon, text: str) -> None:
    """``--object secret,id=...``: parsed, validated and created like object-add."""
    try:
        args = keyval.parse(text, implied_key="qom-type")
    except keyval.KeyvalError as exc:
        raise QMPError.generic(str(exc)) from None
    # typed properties (verify-peer=on) are coerced as QEMU's keyval visitor does
    args = keyval.coerce(args, lambda o: daemon.schema.validate_arguments("object-add", o))
    await object_add(daemon.context(None, "object-add"), args)
