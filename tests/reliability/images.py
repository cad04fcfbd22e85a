"""Test images made by qemu-img, patient with QEMU 7.2's calibration flake."""

from __future__ import annotations

import time

from tests.oracles import qemu_img_create_luks


def qemu_img_luks(path: str, passphrase: str, *, fmt: str = "luks", size: str = "16M",
                  iter_time: int = 10) -> None:
    """qemu_img_create_luks, tried again a few times: on two shared cores QEMU's
    "Unable to get accurate CPU usage" can outlast the oracle's own retries."""
    for attempt in range(4):
        try:
            qemu_img_create_luks(path, passphrase, fmt=fmt, size=size, iter_time=iter_time)
            return
        except AssertionError:
            if attempt == 3:
                raise
            time.sleep(0.5 * (attempt + 1))
