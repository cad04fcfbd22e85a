"""The LUKS1 engine: open, create, add and erase key slots.

Pure functions over bytes and a small I/O interface (:mod:`.io`); no QMP,
no block layer. The surface:

* :func:`read_header`, :func:`open_volume` -> :class:`LuksVolume` (or, with
  ``luks2=True``, :class:`Luks2Volume` for a LUKS2 image: open and data
  path only, no key management yet)
* :func:`create_volume`, :func:`header_length`, :class:`LuksCreateOptions`
* :func:`prepare_amend` -> :class:`AmendPlan` -> :func:`apply_amend`,
  :class:`LuksAmendOptions`
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
from qmpd.crypto.luks.luks2_volume import Luks2Volume
from qmpd.crypto.luks.volume import LuksVolume, open_volume, read_header

__all__ = [
    "AmendPlan", "DEFAULT_ITER_TIME", "ImageIO", "KeySlot", "Luks2Volume", "LuksAmendOptions",
    "LuksCreateOptions", "LuksHeader", "LuksVolume", "MemoryImageIO", "apply_amend",
    "create_volume", "header_length", "open_volume", "precheck_amend", "prepare_amend",
    "read_header",
]
