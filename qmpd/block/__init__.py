"""Block nodes (file, luks, qcow2), QEMU's permission model and image locks.

The command handlers use :class:`qmpd.block.graph.BlockGraph`; the rest is
its machinery: permissions.py (the model as data), locks.py (OFD lock
bytes), file.py (the file node), qcow2.py (headers and new images).
"""
