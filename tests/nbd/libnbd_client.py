"""Checks with libnbd's Python bindings; run as a child of /usr/bin/python3.

Debian ships python3-libnbd for the system Python only, so the tests run
this file as ``/usr/bin/python3 libnbd_client.py URI`` and read the JSON it
prints. It never imports anything from the project.
"""

import json
import sys

import nbd


def main(uri: str) -> None:
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.add_meta_context("qemu:allocation-depth")
    h.connect_uri(uri)
    size = h.get_size()
    out = {
        "size": size, "read_only": h.is_read_only(), "can_df": h.can_df(),
        "can_cache": h.can_cache(), "can_fast_zero": h.can_fast_zero(),
        "can_multi_conn": h.can_multi_conn(), "can_flush": h.can_flush(),
        "can_fua": h.can_fua(), "can_trim": h.can_trim(), "can_zero": h.can_zero(),
        "structured": h.get_structured_replies_negotiated(),
        "contexts": [c for c in ("base:allocation", "qemu:allocation-depth")
                     if h.can_meta_context(c)],
        "block_size": [h.get_block_size(k) for k in
                       (nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED, nbd.SIZE_MAXIMUM)],
    }

    extents = {}

    def on_extents(context, offset, entries, err):
        extents.setdefault(context, []).extend(entries)
        return 0

    h.block_status(size, 0, on_extents)
    out["extents"] = extents
    one = {}
    h.block_status(size, 0, lambda c, o, e, err: one.setdefault(c, e) and 0,
                   nbd.CMD_FLAG_REQ_ONE)
    out["extents_req_one"] = one

    chunks = []

    def on_chunk(buf, offset, status, err):
        chunks.append([offset, len(buf), "hole" if status == nbd.READ_HOLE else "data"])
        return 0

    h.pread_structured(256 * 1024, 0, on_chunk)
    out["sparse_chunks"] = chunks
    df_chunks = []
    h.pread_structured(256 * 1024, 0, lambda b, o, s, e: df_chunks.append([o, len(b)]) or 0,
                       nbd.CMD_FLAG_DF)
    out["df_chunks"] = df_chunks

    h.cache(65536, 0)
    if not h.is_read_only():
        h.pwrite(b"\x5a" * 8192, 8192, nbd.CMD_FLAG_FUA)
        h.zero(4096, 8192, nbd.CMD_FLAG_FAST_ZERO)
        out["after_fast_zero"] = h.pread(8192, 8192).count(0)
        h.trim(4096, 12288)
        h.flush()

    # Many requests in flight; the server answers as they complete.
    order, bufs = [], []
    for i in range(16):
        buf = nbd.Buffer(4096)
        bufs.append(buf)
        h.aio_pread(buf, i * 4096, completion=lambda *a, i=i: order.append(i) or 1)
    while len(order) < 16:
        h.poll(-1)
    out["completion_order"] = order
    out["first_block"] = bufs[0].to_bytearray()[:16].hex()
    h.shutdown()
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
