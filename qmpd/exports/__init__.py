"""Block exports: a node served to outside clients (NBD), as QEMU's block/export/."""
