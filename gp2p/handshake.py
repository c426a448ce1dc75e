"""The handshake: hello / ack, with proof that each side holds its node id's key.

Order: dialer ``hello`` -> acceptor ``hello`` -> dialer ``ack`` -> the acceptor verifies and
admits the peer, and only then sends its ``ack`` -> the dialer verifies. An ack signs
``msgpack(["gp2p-ack-v1", other_nonce, signer_id, verifier_id, network_id])``.

The functions here only talk and verify: they report a wrong network, a bad signature or
our own id as a :class:`HandshakeError` with a reason, after telling the remote. Whether a
verified peer is admitted (duplicates, limits) is the caller's decision. The caller also
bounds the whole exchange with ``handshake_timeout``.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import gevent
import msgpack

from gp2p import messages
from gp2p.codec import CODECS, Codec, by_id
from gp2p.errors import DisconnectReason, HandshakeError, HandshakeTimeout, ProtocolError
from gp2p.identity import Identity, verify
from gp2p.wire import FrameReader, frame, parse_preamble, preamble

log = logging.getLogger(__name__)

__all__ = ["Local", "PeerInfo", "outbound", "inbound", "ack_payload", "disconnect_frame"]

#: frames other than hello/ack/disconnect tolerated (and ignored) before the handshake ends
MAX_EARLY_FRAMES = 16
ACK_DOMAIN = "gp2p-ack-v1"
#: how long telling the remote why we refuse it may take
REFUSE_TIMEOUT = 1.0


@dataclass
class Local:
    """What a node says about itself in its hello."""

    identity: Identity
    network_id: str
    codec: Codec
    max_frame_size: int
    listen: str | None = None
    agent: str = "gp2p"
    features: list[str] = field(default_factory=list)

    def hello(self, nonce: bytes) -> dict[str, Any]:
        return {"type": "hello", "network": self.network_id, "id": self.identity.id,
                "listen": self.listen, "agent": self.agent, "features": self.features,
                "nonce": nonce, "ts": time.time()}

    def encode(self, msg: dict[str, Any]) -> bytes:
        return frame(self.codec.encode(msg), self.max_frame_size)


@dataclass
class PeerInfo:
    """A verified remote node, as its handshake showed it."""

    id: str
    listen: str | None
    agent: str
    features: list[str]
    direction: str          #: "inbound" or "outbound"
    remote_ip: str
    codec: Codec            #: the codec the remote encodes with (we decode with it)
    early_frames: int = 0   #: non-handshake frames ignored before the handshake ended


def ack_payload(other_nonce: bytes, signer_id: str, verifier_id: str, network_id: str) -> bytes:
    """The exact bytes an ack signs."""
    return msgpack.packb([ACK_DOMAIN, other_nonce, signer_id, verifier_id, network_id],
                         use_bin_type=True)


def disconnect_frame(local: Local, reason: DisconnectReason, text: str = "") -> bytes:
    """An encoded ``disconnect`` frame."""
    return local.encode({"type": "disconnect", "reason": int(reason), "text": text[:200]})


class _Exchange:
    """State shared by both directions: the stream, the reader, the remote codec."""

    def __init__(self, stream: Any, local: Local):
        self.stream = stream
        self.local = local
        self.reader = FrameReader(stream, local.max_frame_size)
        self.remote_codec: Codec | None = None
        self.early = 0
        self.preamble_sent = False
        self.remote_id: str | None = None

    def read_remote_preamble(self) -> None:
        codec_id = parse_preamble(self.reader.read_preamble(), CODECS)
        self.remote_codec = by_id(codec_id)

    def next_message(self, expected: str) -> dict[str, Any]:
        """The next hello/ack/disconnect; other frames are ignored, up to a limit."""
        assert self.remote_codec is not None
        while True:
            msg = self.remote_codec.decode(self.reader.read_frame())
            mtype = messages.validate(msg)
            if mtype == "disconnect":
                reason = DisconnectReason.from_wire(msg["reason"])
                raise HandshakeError(f"remote refused: {reason.name} {msg.get('text', '')}".strip(),
                                     reason, self.remote_id, remote=True)
            if mtype == "hello":
                self.remote_id = msg["id"]
            if mtype == expected:
                return msg
            if mtype in messages.HANDSHAKE_TYPES:
                raise ProtocolError(f"expected {expected}, got {mtype}")
            self.early += 1
            if self.early > MAX_EARLY_FRAMES:
                raise ProtocolError("too many messages before the handshake ended")

    def refuse(self, reason: DisconnectReason, text: str) -> HandshakeError:
        """Tell the remote why, and return the error for the caller to raise."""
        data = disconnect_frame(self.local, reason, text)
        if not self.preamble_sent:
            data = preamble(self.local.codec.id) + data
            self.preamble_sent = True
        try:
            # bounded: this may run after the handshake's own deadline has passed
            with gevent.Timeout(REFUSE_TIMEOUT, False):
                self.stream.sendall(data)
        except OSError:
            pass
        return HandshakeError(text, reason, self.remote_id)

    def check_hello(self, hello: dict[str, Any]) -> None:
        if hello["network"] != self.local.network_id:
            raise self.refuse(DisconnectReason.WRONG_NETWORK,
                              f"network {hello['network']!r} is not {self.local.network_id!r}")
        if hello["id"] == self.local.identity.id:
            raise self.refuse(DisconnectReason.SELF_CONNECTION, "connected to myself")

    def check_ack(self, ack: dict[str, Any], hello: dict[str, Any], our_nonce: bytes) -> None:
        signed = ack_payload(our_nonce, hello["id"], self.local.identity.id, self.local.network_id)
        if not verify(hello["id"], ack["sig"], signed):
            raise self.refuse(DisconnectReason.BAD_SIGNATURE, "ack signature does not verify")

    def make_ack(self, hello: dict[str, Any]) -> bytes:
        me = self.local.identity
        sig = me.sign(ack_payload(hello["nonce"], me.id, hello["id"], self.local.network_id))
        return self.local.encode({"type": "ack", "sig": sig})

    def info(self, hello: dict[str, Any], direction: str) -> PeerInfo:
        assert self.remote_codec is not None
        return PeerInfo(id=hello["id"], listen=hello["listen"], agent=hello["agent"],
                        features=list(hello["features"]), direction=direction,
                        remote_ip=self.stream.remote_ip, codec=self.remote_codec,
                        early_frames=self.early)


def outbound(stream: Any, local: Local) -> tuple[PeerInfo, FrameReader]:
    """Run the dialer's side; return the verified peer and the reader to go on with.

    Raises :class:`HandshakeError` (with the reason, ours or the remote's) or
    :class:`ProtocolError`; the caller closes the stream.
    """
    ex = _Exchange(stream, local)
    nonce = os.urandom(messages.NONCE_SIZE)
    stream.sendall(preamble(local.codec.id) + local.encode(local.hello(nonce)))
    ex.preamble_sent = True
    ex.read_remote_preamble()
    try:
        hello = ex.next_message("hello")
        ex.check_hello(hello)
        stream.sendall(ex.make_ack(hello))
        ex.check_ack(ex.next_message("ack"), hello, nonce)
    except ProtocolError as exc:
        raise ex.refuse(exc.reason, str(exc)) from None
    except HandshakeTimeout:
        raise ex.refuse(DisconnectReason.HANDSHAKE_TIMEOUT, "handshake timed out") from None
    return ex.info(hello, "outbound"), ex.reader


def inbound(stream: Any, local: Local) -> tuple[PeerInfo, FrameReader, bytes]:
    """Run the acceptor's side up to the verified dialer's ack.

    Returns the peer, the reader, and our ack frame, which the caller sends only after it
    has admitted the peer (or sends a ``disconnect`` instead). A bad preamble raises
    :class:`ProtocolError` before anything was written.
    """
    ex = _Exchange(stream, local)
    ex.read_remote_preamble()
    try:
        hello = ex.next_message("hello")
        ex.check_hello(hello)
        nonce = os.urandom(messages.NONCE_SIZE)
        stream.sendall(preamble(local.codec.id) + local.encode(local.hello(nonce)))
        ex.preamble_sent = True
        ex.check_ack(ex.next_message("ack"), hello, nonce)
    except ProtocolError as exc:
        raise ex.refuse(exc.reason, str(exc)) from None
    except HandshakeTimeout:
        if not ex.preamble_sent:  # a scanner or silent socket gets nothing at all
            raise
        raise ex.refuse(DisconnectReason.HANDSHAKE_TIMEOUT, "handshake timed out") from None
    return ex.info(hello, "inbound"), ex.reader, ex.make_ack(hello)


def refuse(stream: Any, local: Local, reason: DisconnectReason, text: str) -> None:
    """Send ``disconnect(reason)`` on a stream whose preamble we already sent."""
    try:
        stream.sendall(disconnect_frame(local, reason, text))
    except OSError:
        pass
