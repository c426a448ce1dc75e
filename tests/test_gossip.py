"""Gossip broadcast over real loopback sockets: exactly-once delivery across a network, hop
counts, relaying without a handler, the validation hook, stale frames and the hop limit."""
import logging
import os
import random
import time
from collections import Counter, deque
from itertools import pairwise

import gevent
import pytest

from gp2p import DisconnectReason, EncodeError, FrameTooLarge
from gp2p.testing import RawPeer, wait_until

pytestmark = pytest.mark.timeout(90)

log = logging.getLogger(__name__)


def _peer_of(node, node_id):
    return next(p for p in node.peers if p.id == node_id)


def _record(node, kind="tx"):
    """Register a context handler of ``kind`` on ``node``; return the list it fills with
    ``(sender id or None, payload, origin, msg_id, hops)``."""
    got = []

    @node.on(kind, context=True)
    def record(peer, payload, ctx):
        assert ctx.via == "broadcast"
        got.append((peer.id if peer is not None else None, payload, ctx.origin, ctx.msg_id, ctx.hops))

    return got


def _payloads(got):
    return [g[1] for g in got]


def _make(nodes, **config):
    """A node that dials only whom the test tells it to: the topology is the test's."""
    return nodes.make(target_outbound=0, **config)


def _line(nodes, n, **config):
    """``n`` nodes in a line, each dialling the one before it."""
    line = [_make(nodes, **config) for _ in range(n)]
    for before, after in pairwise(line):
        after.connect(before.address)
    return line


# -- delivery and hop counts ---------------------------------------------------------------


def test_broadcast_reaches_every_node_once_with_hop_counts(nodes):
    a, b, c, _ = line = _line(nodes, 4)
    got = [_record(node) for node in line]
    plain = []
    a.on("plain")(lambda peer, payload: plain.append((peer, payload)))  # two arguments

    msg_id = a.broadcast("tx", {"n": 1, "blob": b"\x00\xff"})
    assert isinstance(msg_id, str) and len(msg_id) == 32 and int(msg_id, 16) >= 0
    wait_until(lambda: all(got), timeout=5)
    payload = {"n": 1, "blob": b"\x00\xff"}
    # the origin's own handler runs with peer=None and hop count 0; then one hop per link
    assert got[0] == [(None, payload, a.id, msg_id, 0)]
    assert got[1] == [(a.id, payload, a.id, msg_id, 1)]
    assert got[2] == [(b.id, payload, a.id, msg_id, 2)]
    assert got[3] == [(c.id, payload, a.id, msg_id, 3)]
    for hops, node in enumerate(line):
        assert node._gossip.hops == Counter({hops: 1})
        assert node._gossip.hops_max == hops
        assert node.metrics["gossip.delivered"] == 1
        assert node.metrics["gossip.duplicates"] == 0
    assert [n.metrics["gossip.forwarded"] for n in line] == [0, 1, 1, 0]

    a.broadcast("plain", "hello")
    wait_until(lambda: plain, timeout=5)
    assert plain == [(None, "hello")]

    # from the middle: both ways, and the origin never gets its own message back
    msg_id = c.broadcast("tx", "mid")
    wait_until(lambda: all(len(g) == 2 for g in got), timeout=5)
    assert [g[1][3:] for g in got] == [(msg_id, 2), (msg_id, 1), (msg_id, 0), (msg_id, 1)]
    assert all(n.metrics["gossip.duplicates"] == 0 for n in line)


def test_a_nodes_own_broadcast_goes_to_all_its_peers(nodes):
    hub = _make(nodes)
    leaves = [_make(nodes) for _ in range(4)]
    for leaf in leaves:
        leaf.connect(hub.address)
    got = [_record(leaf) for leaf in leaves]
    mine = _record(hub)
    msg_id = hub.broadcast("tx", "star")
    wait_until(lambda: all(got) and mine, timeout=5)
    assert all(g == [(hub.id, "star", hub.id, msg_id, 1)] for g in got)
    assert mine == [(None, "star", hub.id, msg_id, 0)]
    # a leaf's broadcast reaches the other leaves through the hub
    leaves[0].broadcast("tx", "leaf")
    wait_until(lambda: all(len(g) == 2 for g in got[1:]) and len(mine) == 2, timeout=5)
    assert [g[1][4] for g in got] == [0, 2, 2, 2]
    assert mine[1][4] == 1


def test_broadcast_without_peers_is_delivered_locally(nodes):
    alone = _make(nodes)
    got = _record(alone)
    msg_id = alone.broadcast("tx", 42)
    wait_until(lambda: got, timeout=5)
    assert got == [(None, 42, alone.id, msg_id, 0)]


def test_a_broadcast_that_cannot_be_sent_raises_and_is_delivered_nowhere(nodes):
    a, b = _line(nodes, 2, max_frame_size=64 * 1024)
    got_a, got_b = _record(a), _record(b)
    for payload in (object(), {1: "int key"}):
        with pytest.raises(EncodeError):
            a.broadcast("tx", payload)
    with pytest.raises(FrameTooLarge):
        a.broadcast("tx", b"x" * (64 * 1024))
    with pytest.raises(EncodeError):
        a.broadcast("gp2p.reserved", 1)
    a.broadcast("tx", "marker")
    wait_until(lambda: got_a and got_b, timeout=5)
    assert _payloads(got_a) == _payloads(got_b) == ["marker"]
    assert a.metrics["gossip.delivered"] == b.metrics["gossip.delivered"] == 1


def test_relaying_does_not_depend_on_a_local_handler(nodes):
    a, b, c = _line(nodes, 3)
    got_a, got_c = _record(a), _record(c)  # b registers nothing
    msg_id = a.broadcast("tx", "through")
    wait_until(lambda: got_c, timeout=5)
    assert got_c == [(b.id, "through", a.id, msg_id, 2)]
    assert got_a == [(None, "through", a.id, msg_id, 0)]
    assert b.metrics["unhandled"] == 1
    assert b.metrics["gossip.delivered"] == 1 and b.metrics["gossip.forwarded"] == 1


# -- a random network of 100 nodes -----------------------------------------------------------


def _random_connected_graph(n, extra, rng):
    """A random spanning tree plus ``extra`` random edges: sorted (dialler, listener) pairs."""
    edges = {(i, rng.randrange(i)) for i in range(1, n)}
    while len(edges) < n - 1 + extra:
        i, j = rng.sample(range(n), 2)
        if (i, j) not in edges and (j, i) not in edges:
            edges.add((i, j))
    return sorted(edges)


def _distances(n, edges, source):
    near = {i: [] for i in range(n)}
    for i, j in edges:
        near[i].append(j)
        near[j].append(i)
    dist = {source: 0}
    todo = deque([source])
    while todo:
        i = todo.popleft()
        for j in near[i]:
            if j not in dist:
                dist[j] = dist[i] + 1
                todo.append(j)
    return dist


def test_every_broadcast_reaches_all_100_nodes_exactly_once(nodes, caplog):
    caplog.set_level(logging.INFO, logger=__name__)
    rng = random.Random(20240604)
    n, extra, count = 100, 75, 20
    edges = _random_connected_graph(n, extra, rng)
    degree = Counter(i for edge in edges for i in edge)
    # slow heartbeats and few workers: a hundred nodes in one process on a small machine
    net = [_make(nodes, heartbeat_interval=5.0, peer_timeout=20.0, handler_concurrency=4,
                 handshake_timeout=20.0, connect_timeout=20.0) for _ in range(n)]
    got = [Counter() for _ in range(n)]
    hops = [{} for _ in range(n)]

    def recorder(i):
        def record(peer, payload, ctx):
            got[i][ctx.msg_id] += 1
            hops[i][ctx.msg_id] = ctx.hops
        return record

    for i, node in enumerate(net):
        node.on("tx", context=True)(recorder(i))
    dials = [gevent.spawn(net[i].connect, net[j].address) for i, j in edges]
    gevent.joinall(dials, timeout=30, raise_error=True)
    wait_until(lambda: all(len(node.peers) == degree[i] for i, node in enumerate(net)), timeout=10)

    origins = [rng.randrange(n) for _ in range(count)]
    ids = [net[i].broadcast("tx", {"seq": k}) for k, i in enumerate(origins)]
    wait_until(lambda: all(len(g) == count for g in got), timeout=30,
               message="a broadcast did not reach every node")
    # every copy in flight has arrived: each frame sent (first sends plus relays) was received
    # once, as a delivery or a duplicate
    sent = sum(degree[i] for i in origins)

    def received_all():
        relayed = sum(node.metrics["gossip.forwarded"] for node in net)
        received = sum(node.metrics["gossip.delivered"] + node.metrics["gossip.duplicates"]
                       for node in net) - count
        return received == sent + relayed

    wait_until(received_all, timeout=20)

    for i in range(n):
        assert got[i] == Counter({msg_id: 1 for msg_id in ids}), f"node {i}"
    farthest = 0
    for msg_id, origin in zip(ids, origins):
        dist = _distances(n, edges, origin)
        for i in range(n):
            assert hops[i][msg_id] >= dist[i]  # a copy never arrives faster than the shortest path
        assert hops[origin][msg_id] == 0
        farthest = max(farthest, max(dist.values()))
    assert sum(node.metrics["gossip.stale"] + node.metrics["gossip.hop_limit"] for node in net) == 0

    delivered = sum(node.metrics["gossip.delivered"] for node in net)
    duplicates = sum(node.metrics["gossip.duplicates"] for node in net)
    assert delivered == n * count
    redundancy = (delivered + duplicates) / delivered
    max_hops = max(node._gossip.hops_max for node in net)
    report = (f"gossip over {n} nodes, {len(edges)} links (mean degree {2 * len(edges) / n:.2f}): "
              f"{count} broadcasts, {delivered} deliveries, 0 missed, 0 doubled; "
              f"redundancy {redundancy:.2f} copies per delivery, largest hop count {max_hops} "
              f"(farthest node from an origin: {farthest} links)")
    print("\n" + report)
    log.info("%s", report)
    assert 1 < redundancy < max(degree.values())
    assert max_hops >= farthest


# -- exactly once, with an edge going down and coming back ------------------------------------


def test_triangle_delivers_10000_broadcasts_exactly_once_while_an_edge_flaps(nodes):
    a, b, c = triangle = [_make(nodes) for _ in range(3)]
    b.connect(a.address)
    c.connect(a.address)
    c.connect(b.address)
    counts = [Counter() for _ in triangle]

    def counter(i):
        def count(peer, payload, ctx):
            counts[i][ctx.msg_id] += 1
        return count

    for i, node in enumerate(triangle):
        node.on("tx", context=True)(counter(i))
    # each event falls mid-batch, while frames are still queued on every link
    total, close_at, reopen_at, reopened_by = 10_000, 3_050, 6_050, 7_050
    ids = []
    reopen = None

    def unlinked():
        return (all(p.id != a.id for p in b.peers) and all(p.id != b.id for p in a.peers))

    for k in range(total):
        ids.append(triangle[k % 3].broadcast("tx", k))
        if k % 100 == 99:
            gevent.sleep(0)  # let the network move while broadcasts go on
        if k == close_at:
            _peer_of(b, a.id).close()  # b drops its link to a, mid-run
            wait_until(unlinked, timeout=5)
        elif k == reopen_at:
            assert unlinked()
            reopen = gevent.spawn(b.connect, a.address)  # handshakes while broadcasts go on
        elif k == reopened_by:
            reopen.get(timeout=10)
            assert {p.id for p in a.peers} == {b.id, c.id}
    # a marker from every node follows everything sent before it on every link
    markers = [node.broadcast("tx", "marker") for node in triangle]
    wait_until(lambda: all(all(m in cnt for m in markers) for cnt in counts), timeout=60)
    expected = Counter({msg_id: 1 for msg_id in ids + markers})
    for node, cnt in zip(triangle, counts):
        assert len(cnt) == total + 3
        assert cnt == expected, f"{node!r}: missed or doubled deliveries"
        assert node.metrics["gossip.delivered"] == total + 3
    assert len(set(ids)) == total
    # there really were two paths: copies came in twice over
    assert sum(node.metrics["gossip.duplicates"] for node in triangle) > total


# -- the validation hook --------------------------------------------------------------------


def test_a_rejected_broadcast_is_not_relayed_past_its_first_hop(nodes):
    a, b, c = _line(nodes, 3)
    got_a, got_c = _record(a), _record(c)
    got_b = []

    def accept(peer, payload):
        if payload == "boom":
            raise ValueError("validator failed")
        return payload != "bad"

    b.on("tx", validate=accept)(lambda peer, payload: got_b.append(payload))
    a.broadcast("tx", "bad")
    a.broadcast("tx", "boom")  # a validator that raises rejects too
    a.broadcast("tx", "good")  # the marker: same path, after the rejected ones
    wait_until(lambda: got_c, timeout=5)
    assert _payloads(got_c) == ["good"]
    assert got_b == ["good"]
    wait_until(lambda: len(got_a) == 3, timeout=5)
    assert _payloads(got_a) == ["bad", "boom", "good"]  # the origin's own delivery happens
    assert b.metrics["rejected"] == 2
    assert _peer_of(b, a.id).misbehaviour == 2
    assert b.metrics["gossip.delivered"] == 1 and b.metrics["gossip.forwarded"] == 1
    assert c.metrics["gossip.delivered"] == 1 and c.metrics["gossip.duplicates"] == 0
    assert _peer_of(c, b.id).misbehaviour == 0
    assert a.peers and b.peers and c.peers  # a rejection does not cost the connection


# -- messages a relay cannot pass on ---------------------------------------------------------


def test_a_message_too_large_to_relay_is_delivered_and_the_link_kept(nodes):
    # b speaks JSON: bytes grow by a third in base64, past max_frame_size
    limits = {"max_frame_size": 64 * 1024}
    a = _make(nodes, **limits)
    b = _make(nodes, codec="json", **limits)
    c = _make(nodes, **limits)
    b.connect(a.address)
    c.connect(b.address)
    got_b, got_c = _record(b), _record(c)
    blob = b"x" * 56_000
    a.broadcast("tx", blob)
    a.broadcast("tx", "marker")
    wait_until(lambda: got_c, timeout=5)
    assert _payloads(got_b) == [blob, "marker"]
    assert _payloads(got_c) == ["marker"]
    assert b.metrics["gossip.unrelayable"] == 1
    assert {p.id for p in b.peers} == {a.id, c.id}  # the source is not blamed
    assert a.metrics["protocol_errors"] == b.metrics["protocol_errors"] == 0


def test_a_lone_surrogate_in_json_is_refused_at_the_edge(nodes):
    node = _make(nodes, heartbeat_interval=5.0, peer_timeout=20.0)
    after = _make(nodes)
    after.connect(node.address)
    got_after = _record(after)
    raw = _raw_to_json(node)
    try:
        # JSON can escape a lone surrogate, which is no text and no codec can encode again
        frame = _frame("tx", "PLACEHOLDER")
        body = raw.local.codec.encode(frame).replace(b'"PLACEHOLDER"', b'"\\ud800"')
        raw.send_bytes(len(body).to_bytes(4, "big") + body)
        msg, _ = raw.recv_until(lambda m: m.get("type") == "disconnect")
        assert DisconnectReason.from_wire(msg["reason"]) == DisconnectReason.PROTOCOL_ERROR
        node.broadcast("tx", "marker")
        wait_until(lambda: got_after, timeout=5)
        assert _payloads(got_after) == ["marker"]  # the bad frame reached nobody
        assert not node.closed and node._failure is None
        assert [p.id for p in node.peers] == [after.id]
    finally:
        raw.close()


# -- hand-made frames: stale, from the future, duplicates and the hop limit -------------------


def _frame(kind, payload, ts=None, hops=1, msg_id=None, origin=None):
    return {"type": "gossip", "origin": origin or os.urandom(32).hex(),
            "id": msg_id or os.urandom(16).hex(), "hops": hops,
            "ts": time.time() if ts is None else ts, "kind": kind, "payload": payload}


def _raw_to(node, codec="msgpack"):
    raw = RawPeer.dial(node.address, codec=codec).handshake()
    wait_until(lambda: any(p.id == raw.identity.id for p in node.peers), timeout=5)
    return raw


def _raw_to_json(node):
    return _raw_to(node, codec="json")


def test_stale_and_future_frames_are_dropped(nodes):
    ttl = 10.0
    # slow heartbeats: the raw peer does not answer pings
    node = _make(nodes, seen_ttl=ttl, heartbeat_interval=5.0, peer_timeout=20.0)
    after = _make(nodes)
    after.connect(node.address)
    got, got_after = _record(node), _record(after)
    raw = _raw_to(node)
    try:
        now = time.time()
        raw.send(_frame("tx", "old", ts=now - ttl - 2))
        raw.send(_frame("tx", "future", ts=now + ttl / 2 + 2))
        raw.send(_frame("tx", "old-but-fresh", ts=now - 0.8 * ttl))
        raw.send(_frame("tx", "ahead-but-fresh", ts=now + 0.3 * ttl))
        raw.send(_frame("tx", "marker"))
        wait_until(lambda: "marker" in _payloads(got_after), timeout=5)
        assert _payloads(got) == ["old-but-fresh", "ahead-but-fresh", "marker"]
        assert _payloads(got_after) == ["old-but-fresh", "ahead-but-fresh", "marker"]
        assert node.metrics["gossip.stale"] == 2
        assert node.metrics["gossip.delivered"] == 3
        assert _peer_of(node, raw.identity.id).misbehaviour == 0
    finally:
        raw.close()


def test_a_duplicate_frame_is_delivered_and_relayed_once(nodes):
    node = _make(nodes, heartbeat_interval=5.0, peer_timeout=20.0)
    after = _make(nodes)
    after.connect(node.address)
    got, got_after = _record(node), _record(after)
    raw = _raw_to(node)
    try:
        frame = _frame("tx", "twice")
        raw.send(frame)
        raw.send({**frame, "hops": 5})  # the same id, another path
        raw.send(_frame("tx", "marker"))
        wait_until(lambda: len(got_after) == 2, timeout=5)
        assert _payloads(got) == _payloads(got_after) == ["twice", "marker"]
        assert got[0][3] == frame["id"] and got[0][4] == 1 and got_after[0][4] == 2
        assert node.metrics["gossip.duplicates"] == 1
        assert node.metrics["gossip.forwarded"] == 2
        assert after.metrics["gossip.duplicates"] == 0
    finally:
        raw.close()


def test_a_frame_at_max_hops_is_delivered_but_not_forwarded(nodes):
    node = _make(nodes, max_hops=3, heartbeat_interval=5.0, peer_timeout=20.0)
    after = _make(nodes)  # default max_hops
    after.connect(node.address)
    got, got_after = _record(node), _record(after)
    raw = _raw_to(node)
    try:
        raw.send(_frame("tx", "at-limit", hops=3))
        raw.send(_frame("tx", "over-limit", hops=40))
        raw.send(_frame("tx", "marker", hops=2))
        wait_until(lambda: got_after, timeout=5)
        assert [(g[1], g[4]) for g in got] == [("at-limit", 3), ("over-limit", 40), ("marker", 2)]
        assert [(g[1], g[4]) for g in got_after] == [("marker", 3)]
        assert node.metrics["gossip.hop_limit"] == 2
        assert node.metrics["gossip.forwarded"] == 1
        assert node._gossip.hops_max == 40
    finally:
        raw.close()
