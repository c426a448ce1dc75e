"""gp2p: a peer-to-peer networking framework for Python on gevent.

Importing gp2p never monkey-patches anything; it works in patched and unpatched programs.
"""
from gp2p.config import Config
from gp2p.dispatch import Context
from gp2p.errors import (
    DisconnectReason, EncodeError, FrameTooLarge, GP2PError, HandshakeError, HandshakeTimeout, PeerGone,
    PeerTimeout, ProtocolError, RemoteError, RequestTimeout,
)
from gp2p.node import Node
from gp2p.peer import Peer

__version__ = "0.1.0"

__all__ = [
    "Node", "Config", "Peer", "Context", "DisconnectReason", "GP2PError", "ProtocolError",
    "HandshakeError", "HandshakeTimeout", "PeerTimeout", "RequestTimeout", "RemoteError",
    "PeerGone", "FrameTooLarge", "EncodeError", "__version__",
]
