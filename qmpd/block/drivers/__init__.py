"""The block drivers, one module each; adding one touches this table and the schema."""

from __future__ import annotations

from qmpd.block.drivers import file, luks, qcow2, raw
from qmpd.block.drivers.base import BlockDriver

DRIVERS: dict[str, BlockDriver] = {
    driver.name: driver for driver in (file.DRIVER, luks.DRIVER, qcow2.DRIVER, raw.DRIVER)
}
