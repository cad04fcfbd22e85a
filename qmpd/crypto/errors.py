"""Errors of the crypto layer; their text is QEMU's wherever QEMU has one."""


class CryptoError(Exception):
    """A failure the user should read: str(err) is the message, never a secret."""
