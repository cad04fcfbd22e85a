"""The block layer: nodes, their drivers, QEMU's permission model, image locks.

graph.py holds the nodes and their links; drivers/ one module per node
type; the verbs (blockdev.py, create.py, amend.py, query.py, resize.py)
take the graph as an argument and are what command handlers call.
"""
