"""blockdev-reopen's option rules, as QEMU's bdrv_reopen_prepare applies them.

An option left out must be one the driver lets a reopen reset (QEMU's
common options and drv->mutable_opts); one given must keep its value unless
the driver's reopen takes new values (qcow2's encrypt.*). Texts measured on
qemu-storage-daemon 7.2 (issue 12).
"""

from __future__ import annotations

import json

import pytest

from qmpd.block import blockdev, query
from qmpd.errors import QMPError
from tests.block.test_graph import (  # noqa: F401 - fixtures
    SECRETS, graph, luks_template, qcow2_img, qcow2_template, raw_img)

pytestmark = pytest.mark.interop


def luks(path: str, **extra) -> dict:
    return {"driver": "luks", "node-name": "l0", "key-secret": "s0",
            "file": {"driver": "file", "filename": path}, **extra}


def qcow2(path: str, **extra) -> dict:
    return {"driver": "qcow2", "node-name": "q0", "encrypt": {"format": "luks", "key-secret": "s0"},
            "file": {"driver": "file", "filename": path}, **extra}


async def reopen_error(graph, options: dict) -> str:
    with pytest.raises(QMPError) as caught:
        await blockdev.reopen(graph, [options])
    return caught.value.desc


async def test_luks_reopen_without_key_secret_is_refused(graph, raw_img):
    await blockdev.add(graph, luks(raw_img))
    options = luks(raw_img)
    del options["key-secret"]
    assert await reopen_error(graph, options) == \
        "Option 'key-secret' cannot be reset to its default value"


async def test_luks_reopen_with_another_key_secret_is_refused(graph, raw_img):
    await blockdev.add(graph, luks(raw_img))
    assert await reopen_error(graph, luks(raw_img, **{"key-secret": "s1"})) == \
        "Cannot change the option 'key-secret'"


async def test_qcow2_reopen_without_encrypt_is_refused(graph, qcow2_img):
    await blockdev.add(graph, qcow2(qcow2_img))
    options = qcow2(qcow2_img)
    del options["encrypt"]
    assert await reopen_error(graph, options) == \
        "Option 'encrypt.format' cannot be reset to its default value"


async def test_qcow2_reopen_takes_a_new_key_secret_and_shows_it(graph, qcow2_img):
    await blockdev.add(graph, qcow2(qcow2_img))
    options = qcow2(qcow2_img, **{"read-only": True})
    options["encrypt"]["key-secret"] = "s1"
    await blockdev.reopen(graph, [options])
    node = next(n for n in query.named_block_nodes(graph) if n["node-name"] == "q0")
    assert node["ro"] is True
    assert json.loads(node["file"][len("json:"):])["encrypt.key-secret"] == "s1"


async def test_common_options_may_be_left_out_or_changed(graph, raw_img):
    await blockdev.add(graph, luks(raw_img, **{"detect-zeroes": "on", "discard": "unmap"}))
    await blockdev.reopen(graph, [luks(raw_img, **{"read-only": True})])
    await blockdev.reopen(graph, [luks(raw_img, **{"detect-zeroes": "off"})])


async def test_a_file_option_given_at_open_cannot_be_dropped(graph, raw_img):
    await blockdev.add(graph, {"driver": "file", "node-name": "f0", "filename": raw_img,
                               "locking": "on"})
    assert await reopen_error(graph, {"driver": "file", "node-name": "f0",
                                      "filename": raw_img}) == \
        "Option 'locking' cannot be reset to its default value"
    assert await reopen_error(graph, {"driver": "file", "node-name": "f0",
                                      "filename": raw_img, "locking": "off"}) == \
        "Cannot change the option 'locking'"


async def test_add_key_after_a_reopen_with_another_key_secret_unlocks_with_the_first(
        graph, qcow2_img):
    """An add-key amend without 'secret' unlocks with the secret the volume was
    opened with, as QEMU keeps it, not the key-secret a later reopen named
    (found by the differential run: qmpd answered 'Invalid password')."""
    from qmpd.block import amend as block_amend
    from tests.block.graph_peer import NoProgress

    await blockdev.add(graph, qcow2(qcow2_img))
    options = qcow2(qcow2_img)
    options["encrypt"]["key-secret"] = "s1"          # not the image's passphrase
    await blockdev.reopen(graph, [options])
    await block_amend.run(graph, "q0", {"driver": "qcow2", "encrypt": {
        "format": "luks", "state": "active", "new-secret": "s1", "iter-time": 10}},
        False, NoProgress(), "x-blockdev-amend")
    node = graph.find("q0")
    assert sum(s.is_active for s in node.volume.header.slots) == 2
