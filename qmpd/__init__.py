"""qmpd: a QMP-compatible daemon that manages the keys of open LUKS images."""

__version__ = "0.1.0"

#: The QEMU release whose QMP behaviour qmpd matches; clients gate features on it.
QEMU_VERSION = (7, 2, 0)
