"""The LUKS1 engine: open, create, add and erase key slots.

Pure functions over bytes and a small I/O interface (:mod:`.io`); no QMP,
no block layer. The surface:

* :func:`read_header`, :func:`open_volume` -> :class:`LuksVolume` (or, with
  ``luks2=True``, :class:`Luks2Volume` for a LUKS2 image)
* :func:`create_volume`, :func:`header_length`, :class:`LuksCreateOptions`
* :func:`prepare_amend` -> :class:`AmendPlan` -> :func:`apply_amend`,
  :class:`LuksAmendOptions`
* LUKS2: :func:`open_luks2_volume`; :func:`create_luks2_volume`,
  :func:`luks2_header_length`, :class:`Luks2CreateOptions`;
  :func:`precheck_luks2_amend`, :func:`prepare_luks2_amend` ->
  :class:`Luks2AmendPlan` -> :func:`apply_luks2_amend` (same options)
"""

from qmpd.crypto.luks.amend import (
    AmendPlan,
    LuksAmendOptions,
    apply_amend,
    precheck_amend,
    prepare_amend,
)
from qmpd.crypto.luks.create import (
    DEFAULT_ITER_TIME,
    LuksCreateOptions,
    create_volume,
    header_length,
)
from qmpd.crypto.luks.header import KeySlot, LuksHeader
from qmpd.crypto.luks.io import ImageIO, MemoryImageIO
from qmpd.crypto.luks.luks2_amend import (
    Luks2AmendPlan,
    apply_luks2_amend,
    precheck_luks2_amend,
    prepare_luks2_amend,
)
from qmpd.crypto.luks.luks2_amend import area_size as luks2_area_size
from qmpd.crypto.luks.luks2_create import (
    Luks2CreateOptions,
    create_luks2_volume,
    luks2_header_length,
)
from qmpd.crypto.luks.luks2_header import SECTOR_SIZE as LUKS2_SECTOR_SIZE
from qmpd.crypto.luks.luks2_volume import Luks2Volume, open_luks2_volume
from qmpd.crypto.luks.volume import LuksVolume, open_volume, read_header

__all__ = [
    "AmendPlan",
    "DEFAULT_ITER_TIME",
    "ImageIO",
    "KeySlot",
    "LUKS2_SECTOR_SIZE",
    "Luks2AmendPlan",
    "luks2_area_size",
    "Luks2CreateOptions",
    "Luks2Volume",
    "LuksAmendOptions",
    "LuksCreateOptions",
    "LuksHeader",
    "LuksVolume",
    "MemoryImageIO",
    "apply_amend",
    "apply_luks2_amend",
    "create_luks2_volume",
    "create_volume",
    "header_length",
    "luks2_header_length",
    "open_luks2_volume",
    "open_volume",
    "precheck_amend",
    "precheck_luks2_amend",
    "prepare_amend",
    "prepare_luks2_amend",
    "read_header",
]
