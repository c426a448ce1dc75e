"""Exceptions raised by gp2p, and the reasons a connection ends.

None of the exceptions derives from :class:`gevent.Timeout`, so an application's
own ``except gevent.Timeout`` never catches a gp2p failure by accident.
"""
from __future__ import annotations

import enum

__all__ = [
    "GP2PError", "ProtocolError", "FrameTooLarge", "HandshakeError", "HandshakeTimeout",
    "PeerTimeout", "RequestTimeout", "RemoteError", "PeerGone", "EncodeError", "DisconnectReason",
]


class DisconnectReason(enum.IntEnum):
    """Why a connection ended. The value is the code sent in a ``disconnect`` message."""

    SHUTDOWN = 1             #: the remote node is stopping
    PROTOCOL_ERROR = 2       #: undecodable frame, bad fields, or a message out of order
    WRONG_NETWORK = 3        #: the hello named another network id
    UNSUPPORTED_VERSION = 4  #: reserved: the preamble already rejects other versions
    BAD_SIGNATURE = 5        #: the ack's signature did not verify
    SELF_CONNECTION = 6      #: the node dialled itself
    DUPLICATE = 7            #: a second connection between the same two nodes
    TOO_MANY_PEERS = 8       #: inbound slots are full
    EVICTED = 9              #: dropped to make room for a newcomer
    BANNED = 10              #: the remote address is banned
    TIMEOUT = 11             #: nothing valid arrived for ``peer_timeout``
    HANDSHAKE_TIMEOUT = 12   #: the handshake did not finish within ``handshake_timeout``
    SLOW_PEER = 13           #: the peer does not read what we send it
    FRAME_TOO_LARGE = 14     #: a frame header announced more than ``max_frame_size``
    MISBEHAVIOUR = 15        #: floods or invalid application data
    CONNECTION_LOST = 16     #: local only: EOF or a reset without a ``disconnect``

    @classmethod
    def from_wire(cls, code: int) -> "DisconnectReason":
        """The member for a received code; unknown codes read as PROTOCOL_ERROR."""
        try:
            return cls(code)
        except ValueError:
            return cls.PROTOCOL_ERROR


class GP2PError(Exception):
    """Base class of every error gp2p raises."""


class ProtocolError(GP2PError):
    """The remote side broke the wire protocol.

    :ivar reason: the :class:`DisconnectReason` the connection is closed with.
    """

    reason = DisconnectReason.PROTOCOL_ERROR

    def __init__(self, message: str, reason: DisconnectReason | None = None):
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class FrameTooLarge(ProtocolError):
    """A frame header announced a body above ``max_frame_size``."""

    reason = DisconnectReason.FRAME_TOO_LARGE


class HandshakeError(GP2PError):
    """The handshake failed; ``reason`` says why (sent by us or by the remote)."""

    def __init__(self, message: str, reason: DisconnectReason = DisconnectReason.PROTOCOL_ERROR,
                 remote_id: str | None = None, remote: bool = False):
        super().__init__(message)
        self.reason = reason
        #: the remote node id, when its hello arrived before the failure
        self.remote_id = remote_id
        #: True when the remote sent the reason (it refused us), False when we decided
        self.remote = remote


class HandshakeTimeout(HandshakeError):
    """The handshake did not finish within ``handshake_timeout``."""

    def __init__(self, message: str = "handshake timed out"):
        super().__init__(message, DisconnectReason.HANDSHAKE_TIMEOUT)


class PeerTimeout(GP2PError):
    """A peer did not answer in time (for example :meth:`Peer.ping`)."""


class RequestTimeout(GP2PError):
    """A request got no answer within its timeout."""


class RemoteError(GP2PError):
    """The remote handler failed; carries the remote exception's type name and message."""

    def __init__(self, type: str, message: str):
        super().__init__(f"{type}: {message}")
        self.type = type
        self.message = message


class EncodeError(GP2PError, ValueError):
    """A value cannot be sent: an unsupported type, a non-str dict key, a bad kind."""


class PeerGone(GP2PError):
    """The peer is not connected, or went away while we waited for it."""
