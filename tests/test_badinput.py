"""Bad input from the network, through real loopback sockets.

Every case feeds a node something wrong by hand (a :class:`~gp2p.testing.RawPeer`) and
checks what the node does to that connection, and that it keeps serving a well-behaved
peer connected to it before the bad input arrived.
"""
import itertools
import os
import struct
import time

import gevent
import pytest

from gp2p import DisconnectReason, HandshakeError
from gp2p.codec import CODECS, by_id
from gp2p.handshake import ack_payload
from gp2p.identity import Identity
from gp2p.messages import NONCE_SIZE
from gp2p.testing import RawPeer, disconnect_reason, next_host, wait_until
from gp2p.wire import frame, parse_preamble, preamble

#: small timeouts so the file runs in seconds; peer_timeout stays roomy because a RawPeer
#: does not answer the node's heartbeat pings
FAST = {"heartbeat_interval": 0.2, "peer_timeout": 5.0, "handshake_timeout": 1.0}
MAX_FRAME = 4096
#: slack on top of a timeout before we call it late (the machine is shared and busy)
SLACK = 1.5


class Served:
    """A node under test, ``a``, and a well-behaved node ``b`` connected to it.

    :meth:`check` shows that ``a`` still serves ``b``: a message from ``b`` reaches a
    handler on ``a``, which answers with ``node.send``, and the answer reaches ``b``.
    """

    def __init__(self, nodes, **config):
        self.a = nodes.make(**{**FAST, **config})
        self.b = nodes.make(**FAST)
        self.echoes = []
        self._tokens = itertools.count()
        self.a.on("echo")(lambda peer, payload: self.a.send(peer, "echoed", payload))
        self.b.on("echoed")(lambda peer, payload: self.echoes.append(payload))
        self.b_peer = self.b.connect(self.a.address)
        self.a_peer = self.a._pm.by_id[self.b.id]
        self.check()

    def check(self):
        token = next(self._tokens)
        self.b.send(self.a.id, "echo", token)
        wait_until(lambda: token in self.echoes, timeout=5,
                   message=f"the node under test stopped serving its good peer ({token})")
        # the same connection on both sides, not a new one
        assert self.a._pm.by_id[self.b.id] is self.a_peer and not self.a_peer.closed
        assert self.b._pm.by_id[self.a.id] is self.b_peer and not self.b_peer.closed


@pytest.fixture
def served(nodes):
    return lambda **config: Served(nodes, **config)


# -- helpers to drive the dialer's side of the handshake by hand ---------------------

def send_hello(raw, before=b""):
    """Send our preamble, ``before`` (raw frames), then our hello; return our nonce."""
    nonce = os.urandom(NONCE_SIZE)
    hello = raw.local.encode(raw.local.hello(nonce))
    raw.send_bytes(preamble(raw.local.codec.id) + before + hello)
    return nonce


def read_hello(raw):
    """Read the acceptor's preamble and hello."""
    with gevent.Timeout(5):
        codec_id = parse_preamble(raw.reader.read_preamble(), CODECS)
    raw.remote_codec = by_id(codec_id)
    hello = raw.recv()
    assert hello["type"] == "hello"
    return hello


def ack_for(raw, hello):
    """Our valid ack frame for the acceptor's ``hello``."""
    me = raw.identity
    sig = me.sign(ack_payload(hello["nonce"], me.id, hello["id"], raw.local.network_id))
    return raw.local.encode({"type": "ack", "sig": sig})


def ping(raw, nonce):
    return raw.local.encode({"type": "ping", "nonce": nonce})


def expect_disconnect(raw, reason):
    """The next disconnect frame carries ``reason``, and then the connection closes."""
    msg, _ = raw.recv_until(lambda m: m.get("type") == "disconnect")
    assert disconnect_reason(msg) == reason, msg
    assert raw.wait_closed() == b""


def silent(address, source=None):
    """A TCP connection that sends nothing, with the time it was connected."""
    raw = RawPeer.dial(address, source=source)
    return raw, time.monotonic()


# -- 1. preamble ---------------------------------------------------------------------

@pytest.mark.parametrize("first_bytes,reason", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "PROTOCOL_ERROR"),     # wrong magic: HTTP
    (b"GP2Q\x01\x01", "PROTOCOL_ERROR"),                          # wrong magic
    (preamble(1, version=2), "UNSUPPORTED_VERSION"),
    (preamble(9), "PROTOCOL_ERROR"),                              # unsupported codec id
], ids=["http", "magic", "version", "codec"])
def test_bad_preamble_is_closed_with_nothing_written(served, first_bytes, reason):
    s = served()
    raw = RawPeer.dial(s.a.address)
    hello = raw.local.encode(raw.local.hello(os.urandom(NONCE_SIZE)))
    raw.send_bytes(first_bytes + (hello if first_bytes.startswith(b"GP2P") else b""))
    assert raw.wait_closed() == b""
    wait_until(lambda: s.a.metrics[f"handshake_failed.{reason}"] == 1)
    assert sum(v for k, v in s.a.metrics.counters.items()
               if k.startswith("handshake_failed.")) == 1
    assert s.a._pm.pending == 0 and len(s.a.peers) == 1
    s.check()


# -- 2. oversized length header ------------------------------------------------------

def test_oversized_header_after_handshake_closes_before_the_body(served):
    s = served(max_frame_size=MAX_FRAME)
    raw = RawPeer.dial(s.a.address).handshake()
    wait_until(lambda: raw.identity.id in s.a._pm.by_id)
    raw.send_bytes(struct.pack(">I", MAX_FRAME + 1))  # the header alone, never a body
    expect_disconnect(raw, DisconnectReason.FRAME_TOO_LARGE)
    wait_until(lambda: s.a.metrics["disconnects.FRAME_TOO_LARGE"] == 1)
    assert s.a.metrics["protocol_errors"] == 1
    assert raw.identity.id not in s.a._pm.by_id
    s.check()


@pytest.mark.parametrize("split", [False, True], ids=["with-preamble", "after-preamble"])
def test_oversized_header_before_handshake_closes_before_the_body(served, split):
    s = served(max_frame_size=MAX_FRAME)
    raw = RawPeer.dial(s.a.address)
    header = struct.pack(">I", 2**32 - 1)
    if split:
        raw.send_preamble()
        # the preamble alone is good: the node takes it and waits for a hello
        wait_until(lambda: s.a._pm.pending == 1)
        raw.send_bytes(header)
    else:
        raw.send_bytes(preamble(raw.local.codec.id) + header)
    # the acceptor read a good preamble, so it may answer; whatever it says, it says
    # FRAME_TOO_LARGE and closes
    with gevent.Timeout(5):
        parse_preamble(raw.reader.read_preamble(), CODECS)
    expect_disconnect(raw, DisconnectReason.FRAME_TOO_LARGE)
    wait_until(lambda: s.a.metrics["handshake_failed.FRAME_TOO_LARGE"] == 1)
    assert s.a._pm.pending == 0
    s.check()


# -- 3. undecodable body ---------------------------------------------------------------

@pytest.mark.parametrize("codec,body", [
    ("msgpack", b"\xc1garbage"),            # 0xc1 is never used by msgpack
    ("msgpack", b"\x81\xa4type\xa4ping\xff"),  # a valid map followed by extra bytes
    ("json", b"{not json"),
    ("json", b"\xff\xfe\x00"),              # not even UTF-8
], ids=["msgpack-c1", "msgpack-extra", "json-syntax", "json-utf8"])
def test_undecodable_frame_after_handshake_is_a_protocol_error(served, codec, body):
    s = served()
    raw = RawPeer.dial(s.a.address, codec=codec).handshake()
    wait_until(lambda: raw.identity.id in s.a._pm.by_id)
    raw.send_bytes(frame(body, MAX_FRAME))
    expect_disconnect(raw, DisconnectReason.PROTOCOL_ERROR)
    wait_until(lambda: s.a.metrics["disconnects.PROTOCOL_ERROR"] == 1)
    assert s.a.metrics["protocol_errors"] == 1
    s.check()


# -- 4. known types with bad fields --------------------------------------------------

@pytest.mark.parametrize("msg", [
    {"type": "ping", "nonce": "x"},
    {"type": "ping"},
    {"type": "pong", "nonce": -1},
    {"type": "msg", "payload": 1},                 # no kind
    {"type": "msg", "kind": "", "payload": 1},
    {"type": "msg", "kind": 7, "payload": 1},
    {"type": "disconnect", "reason": "bye"},
    {"type": "hello"},                             # a handshake message, after it
    [1, 2, 3],                                     # not a map
    {"type": 5},
], ids=["ping-str-nonce", "ping-no-nonce", "pong-negative", "msg-no-kind", "msg-empty-kind",
        "msg-int-kind", "disconnect-str-reason", "late-hello", "not-a-map", "int-type"])
def test_bad_fields_after_handshake_are_a_protocol_error(served, msg):
    s = served()
    got = []
    s.a.on("chat")(lambda peer, payload: got.append(payload))
    raw = RawPeer.dial(s.a.address).handshake()
    wait_until(lambda: raw.identity.id in s.a._pm.by_id)
    raw.send(msg)
    expect_disconnect(raw, DisconnectReason.PROTOCOL_ERROR)
    wait_until(lambda: s.a.metrics["disconnects.PROTOCOL_ERROR"] == 1)
    assert s.a.metrics["protocol_errors"] == 1
    s.check()
    assert got == []  # nothing malformed reached a handler


# -- 5. unknown types ----------------------------------------------------------------

def test_unknown_types_are_ignored_and_counted(served):
    s = served()
    raw = RawPeer.dial(s.a.address).handshake()
    raw.send({"type": "frobnicate", "x": 1})
    raw.send({"type": "future-thing"})
    raw.send({"type": "ping", "nonce": 4242})
    pong, before = raw.recv_until(lambda m: m.get("type") == "pong")
    assert pong["nonce"] == 4242
    assert all(m.get("type") in ("ping", "addr") for m in before)  # heartbeats and its self-announcement
    assert s.a.metrics["unknown_types"] == 2
    assert s.a.metrics["protocol_errors"] == 0
    assert raw.identity.id in s.a._pm.by_id
    s.check()


# -- 6. messages before the handshake ends ------------------------------------------

def test_messages_before_the_handshake_are_not_answered(served):
    s = served()
    got = []
    s.a.on("chat")(lambda peer, payload: got.append(payload))
    raw = RawPeer.dial(s.a.address)
    early_msg = raw.local.encode({"type": "msg", "kind": "chat", "payload": "early"})
    send_hello(raw, before=ping(raw, 1) + early_msg)      # before our hello
    hello = read_hello(raw)
    raw.send_bytes(ping(raw, 2) + early_msg + ack_for(raw, hello))  # between hello and ack
    ack = raw.recv()
    assert ack["type"] == "ack"
    raw.send_bytes(ping(raw, 3))                          # the marker, after the handshake
    pong, before = raw.recv_until(lambda m: m.get("type") == "pong")
    assert pong["nonce"] == 3, "a ping sent before the handshake ended was answered"
    assert all(m.get("type") in ("ping", "addr") for m in before)  # heartbeats, self-announcement
    peer = s.a._pm.by_id[raw.identity.id]
    assert peer.info.early_frames == 4
    # and an application message after the handshake is delivered, the early ones never
    raw.send({"type": "msg", "kind": "chat", "payload": "late"})
    wait_until(lambda: got)
    assert got == ["late"]
    s.check()


# -- 7. a silent socket ------------------------------------------------------------

def test_silent_socket_is_closed_at_handshake_timeout(served):
    s = served()
    timeout = s.a.config.handshake_timeout
    raw, t0 = silent(s.a.address)
    wait_until(lambda: s.a._pm.pending == 1)
    assert raw.wait_closed(timeout + 5) == b""
    elapsed = time.monotonic() - t0
    assert timeout * 0.8 <= elapsed < timeout + SLACK, elapsed
    wait_until(lambda: s.a.metrics["handshake_failed.HANDSHAKE_TIMEOUT"] == 1)
    assert s.a._pm.pending == 0
    s.check()


# -- 8. a trickling peer -----------------------------------------------------------

def test_trickling_peer_is_cut_at_handshake_timeout_from_accept(served):
    s = served()
    timeout = s.a.config.handshake_timeout
    raw = RawPeer.dial(s.a.address)
    t0 = time.monotonic()
    data = preamble(raw.local.codec.id) + raw.local.encode(raw.local.hello(os.urandom(NONCE_SIZE)))
    sent = [0]

    def trickle():
        try:
            for i in range(len(data)):
                raw.send_bytes(data[i:i + 1])
                sent[0] += 1
                gevent.sleep(0.1)
        except OSError:
            pass

    trickler = gevent.spawn(trickle)
    try:
        # the node answers nothing: the preamble is never complete enough for the hello
        assert raw.wait_closed(timeout + 5) == b""
        elapsed = time.monotonic() - t0
    finally:
        trickler.kill()
    assert timeout * 0.8 <= elapsed < timeout + SLACK, elapsed
    # it was cut while still trickling (each byte arriving did not extend the deadline)
    assert 0 < sent[0] < len(data)
    wait_until(lambda: s.a.metrics["handshake_failed.HANDSHAKE_TIMEOUT"] == 1)
    s.check()


# -- 9. max_pending ----------------------------------------------------------------

def test_sockets_beyond_max_pending_are_closed_at_accept(served):
    s = served(max_pending=3, handshake_timeout=3.0)
    timeout = s.a.config.handshake_timeout
    waiting = [silent(s.a.address) for _ in range(3)]
    wait_until(lambda: s.a._pm.pending == 3)
    extra, t0 = silent(s.a.address)
    assert extra.wait_closed(timeout + 5) == b""
    assert time.monotonic() - t0 < min(SLACK, timeout / 2)  # at accept, not at the timeout
    assert s.a.metrics["refused.pending"] == 1
    assert s.a._pm.pending == 3  # the three are still waiting
    s.check()
    for raw, connected in waiting:
        assert raw.wait_closed(timeout + 5) == b""
        assert time.monotonic() - connected >= timeout * 0.8  # open until their timeout
    wait_until(lambda: s.a.metrics["handshake_failed.HANDSHAKE_TIMEOUT"] == 3)
    # room again: a newcomer gets through
    c = RawPeer.dial(s.a.address).handshake()
    assert c.info.id == s.a.id
    assert s.a.metrics["refused.pending"] == 1
    c.close()
    s.check()


# -- 10. max_per_ip ----------------------------------------------------------------

def test_sockets_beyond_max_per_ip_are_closed_at_accept(served):
    s = served(max_per_ip=2, handshake_timeout=3.0)
    timeout = s.a.config.handshake_timeout
    ip = next_host()
    same = [silent(s.a.address, source=ip) for _ in range(2)]
    wait_until(lambda: s.a._pm.pending == 2)
    extra, t0 = silent(s.a.address, source=ip)
    assert extra.wait_closed(timeout + 5) == b""
    assert time.monotonic() - t0 < min(SLACK, timeout / 2)
    assert s.a.metrics["refused.per_ip"] == 1
    # another IP is not affected
    other = RawPeer.dial(s.a.address).handshake()
    assert other.info.id == s.a.id
    assert s.a._pm.pending == 2
    s.check()
    for raw, _ in same:
        raw.close()
    other.close()
    wait_until(lambda: s.a._pm.pending == 0 and ip not in s.a._pm._per_ip)
    # the IP's slots are free again
    again = RawPeer.dial(s.a.address, source=ip).handshake()
    assert again.info.id == s.a.id
    assert s.a.metrics["refused.per_ip"] == 1
    again.close()
    s.check()


# -- 11. wrong network -------------------------------------------------------------

def test_wrong_network_in_hello_is_refused(served, nodes):
    s = served()
    raw = RawPeer.dial(s.a.address, network_id="another-net")
    send_hello(raw)
    with gevent.Timeout(5):
        parse_preamble(raw.reader.read_preamble(), CODECS)
    # no hello of its own: the refusal comes first, then the close
    msg = raw.recv()
    assert disconnect_reason(msg) == DisconnectReason.WRONG_NETWORK, msg
    assert raw.wait_closed() == b""
    wait_until(lambda: s.a.metrics["handshake_failed.WRONG_NETWORK"] == 1)
    # the same through the real dialer, a RawPeer's and a node's
    with pytest.raises(HandshakeError) as info:
        RawPeer.dial(s.a.address, network_id="another-net").handshake()
    assert info.value.reason == DisconnectReason.WRONG_NETWORK
    other = nodes.make(network_id="another-net", **FAST)
    with pytest.raises(HandshakeError) as info:
        other.connect(s.a.address)
    assert info.value.reason == DisconnectReason.WRONG_NETWORK
    wait_until(lambda: s.a.metrics["handshake_failed.WRONG_NETWORK"] == 3)
    assert not other.peers and [p.id for p in s.a.peers] == [s.b.id]
    s.check()


# -- 12. bad ack signature ---------------------------------------------------------

@pytest.mark.parametrize("forge", ["random", "garbage-signed", "wrong-nonce", "other-key"])
def test_bad_ack_signature_is_refused(served, forge):
    s = served()
    raw = RawPeer.dial(s.a.address)
    send_hello(raw)
    hello = read_hello(raw)
    me = raw.identity
    if forge == "random":
        sig = os.urandom(64)
    elif forge == "garbage-signed":
        sig = me.sign(b"garbage")
    elif forge == "wrong-nonce":
        sig = me.sign(ack_payload(os.urandom(NONCE_SIZE), me.id, hello["id"], raw.local.network_id))
    else:
        sig = Identity().sign(ack_payload(hello["nonce"], me.id, hello["id"], raw.local.network_id))
    raw.send({"type": "ack", "sig": sig})
    expect_disconnect(raw, DisconnectReason.BAD_SIGNATURE)
    wait_until(lambda: s.a.metrics["handshake_failed.BAD_SIGNATURE"] == 1)
    assert me.id not in s.a._pm.by_id and s.a._pm.pending == 0
    s.check()
