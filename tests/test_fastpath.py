"""The hot paths: direct writes beside the writer, the shared receive buffer, the RTT median,
what an idle connection holds, and the hand-off of a blocked handler's inbox."""
import hashlib
import random
import statistics

import gevent
import msgpack
import pytest
from gevent.event import Event

from gp2p import wire
from gp2p.codec import MsgpackCodec
from gp2p.errors import FrameTooLarge, ProtocolError
from gp2p.testing import alive_greenlets, wait_until
from gp2p.wire import FrameReader, StreamClosed, frame

pytestmark = pytest.mark.timeout(60)


def _peer_of(node, node_id):
    return next(p for p in node.peers if p.id == node_id)


def _blob(sender: int, seq: int, size: int) -> bytes:
    """Bytes whose every byte depends on (sender, seq): a splice of two frames shows."""
    seed = hashlib.sha256(f"{sender}:{seq}".encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


# -- one writer per socket -----------------------------------------------------------------


def test_pings_and_pongs_never_interleave_with_large_frames_being_written(nodes):
    # Large frames keep the writer greenlet inside sendall (the socket buffer is full) while
    # pings and pongs, which would go out directly on an idle socket, fly both ways; a byte
    # of one spliced into another breaks the framing (PROTOCOL_ERROR) or a payload.
    a = nodes.make(heartbeat_interval=0.02, peer_timeout=5.0)
    b = nodes.make(heartbeat_interval=0.02, peer_timeout=5.0)
    got = {0: [], 1: []}
    bad = []

    @b.on("blob")
    def blob(peer, payload):
        sender, seq, data = payload
        if data != _blob(sender, seq, len(data)):
            bad.append((sender, seq))
        got[sender].append(seq)

    peer = a.connect(b.address)
    back = _peer_of(b, a.id)
    count, sizes = 60, (200_000, 70_000, 5, 130_000)
    rtts = []

    def send(sender):
        for seq in range(count):
            a.send(peer, "blob", [sender, seq, _blob(sender, seq, sizes[seq % len(sizes)])])

    def ping(who):
        for _ in range(150):
            rtts.append(who.ping(timeout=5))
            gevent.sleep(0)

    workers = [gevent.spawn(send, 0), gevent.spawn(send, 1), gevent.spawn(ping, peer), gevent.spawn(ping, back)]
    gevent.joinall(workers, timeout=40, raise_error=True)
    wait_until(lambda: len(got[0]) == len(got[1]) == count, timeout=20)
    assert got[0] == list(range(count)) and got[1] == list(range(count))
    assert not bad and len(rtts) == 300
    assert not peer.closed and not back.closed
    assert a.metrics["protocol_errors"] == b.metrics["protocol_errors"] == 0


# -- the RTT median --------------------------------------------------------------------------


def test_rtt_is_the_median_of_the_last_16_samples(nodes):
    a = nodes.make(heartbeat_interval=30, peer_timeout=90)
    b = nodes.make(heartbeat_interval=30, peer_timeout=90)
    peer = a.connect(b.address)
    assert peer.rtt is None
    rng = random.Random(5)
    samples = []
    for i in range(300):
        value = rng.choice([0.001, 0.002, 0.5]) if i % 7 == 0 else rng.random()  # with ties
        samples.append(value)
        peer._add_rtt(value)
        assert peer.rtt == statistics.median(samples[-16:])
    for _ in range(5):
        rtt = peer.ping(timeout=5)
        samples.append(rtt)
        assert peer.rtt == statistics.median(samples[-16:])


# -- what an idle connection holds -------------------------------------------------------------


def test_an_idle_connection_runs_only_its_reader_and_its_frames_decode_in_place(nodes):
    a = nodes.make(heartbeat_interval=0.05, peer_timeout=2.0)
    b = nodes.make(heartbeat_interval=0.05, peer_timeout=2.0)
    got = []
    b.on("n")(lambda peer, payload: got.append(payload))
    peer = a.connect(b.address)
    for i in range(2000):  # a burst: queued behind the first frame, written by the hub or a writer
        a.send(peer, "n", i)
    a.send(peer, "n", b"x" * 300_000)
    wait_until(lambda: len(got) == 2001, timeout=10)
    assert got[:2000] == list(range(2000))
    back = _peer_of(b, a.id)
    wait_until(lambda: peer.rtt is not None and back.rtt is not None, timeout=5)  # heartbeats go round
    for node, other in ((a, b), (b, a)):
        prefix = f"{node.tasks.name}:peer:{other.id[:8]}:"
        wait_until(lambda: [g.name for g in alive_greenlets(prefix)] == [prefix + "reader"], timeout=5)
    assert peer._out is None and peer._reader._body is None


# -- handlers ------------------------------------------------------------------------------


def test_a_blocked_handler_hands_its_peers_next_messages_to_another_worker(nodes):
    receiver = nodes.make(handler_concurrency=3)
    sender = nodes.make()
    release = Event()
    started = []

    @receiver.on("job")
    def job(peer, payload):
        started.append(payload)
        if payload == 0:
            release.wait()

    sender.connect(receiver.address)
    for i in range(50):
        sender.send(receiver.id, "job", i)
    try:
        # the first one blocks; the other 49 still run, in order, meanwhile
        wait_until(lambda: len(started) == 50, timeout=10)
        assert started == list(range(50))
    finally:
        release.set()


# -- the frame reader ------------------------------------------------------------------------


class _Chunks:
    """A stream that returns ``data`` in the given chunk sizes (then EOF)."""

    def __init__(self, data: bytes, sizes):
        self.data = data
        self.pos = 0
        self.sizes = iter(sizes)

    def recv_into(self, buf, nbytes=0):
        view = memoryview(buf).cast("B")
        want = min(len(view), nbytes or len(view), next(self.sizes, 1 << 30), len(self.data) - self.pos)
        view[:want] = self.data[self.pos:self.pos + want]
        self.pos += want
        return want


SIZES = [0, 1, 100, 16 * 1024 - 1, 16 * 1024, 16 * 1024 + 1, 65536, wire.RECV_CHUNK - 4,
         wire.RECV_CHUNK, wire.RECV_CHUNK + 7, 300_000, 1_000_000]


@pytest.mark.parametrize("seed", range(6))
def test_reader_returns_every_frame_whatever_the_receive_sizes(seed):
    rng = random.Random(seed)
    bodies = [_blob(seed, i, rng.choice(SIZES)) for i in range(40)]
    stream = b"".join(frame(body, 1 << 21) for body in bodies)
    cuts = [rng.choice([1, 3, 4, 5, 100, 4096, 65536, 200_000, rng.randrange(1, 150_000)]) for _ in range(4000)]
    reader = FrameReader(_Chunks(stream, cuts), 1 << 21)
    out = []
    while len(out) < len(bodies):
        out.extend(reader.read_messages(bytes))
    assert out == bodies
    assert reader.buffered == 0 and reader._body is None
    with pytest.raises(StreamClosed):
        reader.read_messages(bytes)


def test_two_readers_share_the_receive_buffer_without_spoiling_each_others_frames():
    # Reader A stops in the middle of a large frame, then reader B receives many frames into
    # the thread's buffer, then A finishes its frame.
    big = _blob(1, 1, 100_000)
    small = [_blob(2, i, 5000) for i in range(30)]
    a_data = frame(b"first", 1 << 20) + frame(big, 1 << 20)
    reader_a = FrameReader(_Chunks(a_data, [60_000]), 1 << 20)
    reader_b = FrameReader(_Chunks(b"".join(frame(s, 1 << 20) for s in small), [wire.RECV_CHUNK]), 1 << 20)
    assert reader_a.read_messages(bytes) == [b"first"]  # the big one is unfinished
    assert reader_a._body is not None
    got_b = []
    while len(got_b) < len(small):
        got_b.extend(reader_b.read_messages(bytes))
    assert got_b == small
    assert reader_a.read_messages(bytes) == [big]


def test_reader_decodes_in_place_and_raises_a_decode_error_after_the_frames_before_it():
    codec = MsgpackCodec()
    good = [codec.encode({"type": "ping", "nonce": i}) for i in range(3)]
    data = b"".join(frame(body, 1 << 20) for body in good) + frame(b"\xc1", 1 << 20) + frame(good[0], 1 << 20)
    reader = FrameReader(_Chunks(data, [len(data)]), 1 << 20)
    assert reader.read_messages(codec.decode) == [{"type": "ping", "nonce": i} for i in range(3)]
    with pytest.raises(ProtocolError):
        reader.read_messages(codec.decode)


def test_a_large_header_alone_does_not_allocate_the_whole_frame():
    data = (4_000_000).to_bytes(4, "big") + b"x" * 1000
    reader = FrameReader(_Chunks(data, [len(data)]), 4 * 1024 * 1024)
    with pytest.raises(StreamClosed):
        reader.read_messages(bytes)
    assert reader.buffered == 1000
    assert len(reader._body) <= wire.BODY_STEP
    with pytest.raises(FrameTooLarge):
        FrameReader(_Chunks((5_000_000).to_bytes(4, "big"), [4]), 4 * 1024 * 1024).read_messages(bytes)


def test_msgpack_timestamps_arrive_as_floats_not_as_objects():
    decoded = MsgpackCodec().decode(msgpack.packb({"type": "msg", "kind": "k", "payload": msgpack.Timestamp(3, 5)}))
    assert decoded["payload"] == pytest.approx(3.000000005) and type(decoded["payload"]) is float


# -- validation fast paths -------------------------------------------------------------------

_VALUES = [None, True, 0, 1, -1, 2**64, 2**64 - 1, 1.5, "", "k", "x" * 256, "x" * 257, b"b", [], {},
           "ab" * 32, "AB" * 32, "ab" * 31]


def _optional(mtype):
    from gp2p.messages import _OPTIONAL
    return _OPTIONAL.get(mtype, {})


def _reference(msg):
    """What validate() checks, spelled the slow way from the schema tables."""
    from gp2p.messages import _OPTIONAL, SCHEMAS
    schema = SCHEMAS[msg["type"]]
    for name, check in schema.items():
        if name not in msg or not check(msg[name]):
            return False
    return all(check(msg[name]) for name, check in _OPTIONAL.get(msg["type"], {}).items() if name in msg)


@pytest.mark.parametrize("mtype", ["msg", "gossip", "request", "response"])
def test_the_fast_paths_of_validate_accept_exactly_what_the_schema_does(mtype):
    from gp2p.messages import SCHEMAS, validate
    rng = random.Random(mtype)
    fields = list(SCHEMAS[mtype])
    good = {"msg": {"kind": "k", "payload": None},
            "gossip": {"origin": "ab" * 32, "id": "i", "hops": 1, "ts": 1.0, "kind": "k", "payload": 1},
            "request": {"id": 7, "kind": "k", "payload": b"p"},
            "response": {"id": 7, "ok": True, "payload": 1}}[mtype]
    fields = fields + list(_optional(mtype))
    for _ in range(3000):
        msg = {"type": mtype, **good}
        for name in rng.sample(fields, rng.randrange(0, 3)):
            if rng.random() < 0.2:
                msg.pop(name, None)
            else:
                msg[name] = rng.choice(_VALUES)
        try:
            validate(msg)
            accepted = True
        except ProtocolError:
            accepted = False
        assert accepted == _reference(msg), msg
