"""Identity: a node's Ed25519 key pair; the node id is the hex public key.

A peer cannot claim someone else's id, because the handshake makes it sign with the
matching private key.
"""
from __future__ import annotations

import os

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

__all__ = ["Identity", "verify", "is_node_id", "short_id"]

KEY_SIZE = 32
SIGNATURE_SIZE = 64
_HEX = frozenset("0123456789abcdef")


def is_node_id(value: object) -> bool:
    """True for a 64-character lowercase hex string (an Ed25519 public key)."""
    if type(value) is str and value in _VALID_IDS:  # every addr entry carries one: remember them
        return True
    if not (isinstance(value, str) and len(value) == 2 * KEY_SIZE and _HEX.issuperset(value)):
        return False
    if type(value) is str:
        if len(_VALID_IDS) >= _VALID_IDS_MAX:
            _VALID_IDS.clear()
        _VALID_IDS.add(value)
    return True


_VALID_IDS: set[str] = set()
_VALID_IDS_MAX = 65536


def short_id(node_id: str | None) -> str:
    """The first 8 hex digits, for logs and reprs."""
    return node_id[:8] if node_id else "?"


def verify(node_id: str, signature: bytes, data: bytes) -> bool:
    """True when ``signature`` over ``data`` was made by the key whose hex is ``node_id``."""
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(node_id))
        key.verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


class Identity:
    """A private key and the node id it implies."""

    def __init__(self, private_key: Ed25519PrivateKey | None = None):
        self._key = private_key or Ed25519PrivateKey.generate()
        public = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.id = public.hex()

    def __repr__(self) -> str:
        return f"<Identity {short_id(self.id)}>"

    def sign(self, data: bytes) -> bytes:
        """An Ed25519 signature of ``data``."""
        return self._key.sign(data)

    def private_bytes(self) -> bytes:
        """The raw 32-byte private key."""
        return self._key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    @classmethod
    def load_or_create(cls, path: str) -> "Identity":
        """Load the raw key at ``path``, or create one there with mode 0600.

        The new file is written to a temporary name and renamed, so a crash never leaves
        half a key behind.
        """
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            identity = cls()
            tmp = f"{path}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, identity.private_bytes())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            return identity
        if len(data) != KEY_SIZE:
            raise ValueError(f"{path} is not a 32-byte Ed25519 private key")
        return cls(Ed25519PrivateKey.from_private_bytes(data))
