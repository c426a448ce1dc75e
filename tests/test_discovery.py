"""Discovery on loopback: a network found from one seed, restarts, getaddr / addr rules, relay.

The pure address book has its own tests (test_addressbook.py); here nodes and hand-driven
:class:`~gp2p.testing.RawPeer` connections exercise what :mod:`gp2p.discovery`, the dialer
and the peer manager do with it.
"""
import gc
import logging
import math
import os
import time

import gevent
import pytest
from gevent import socket as gsocket
from gevent.greenlet import Greenlet
from hypothesis import given, settings
from hypothesis import strategies as st

from gp2p import DisconnectReason
from gp2p.addressfile import load
from gp2p.discovery import ADDR_BURST, ADDR_RATE, ANSWER_FLOOR, ANSWER_FRACTION, ASK_SOURCES
from gp2p.identity import Identity
from gp2p.messages import MAX_ADDR_ENTRIES
from gp2p.netgroup import network_group
from gp2p.ratelimit import TokenBucket
from gp2p.swarm import connected_components
from gp2p.testing import NodeFactory, RawPeer, disconnect_reason, next_host, wait_until

#: a RawPeer does not answer the node's pings: keep it alive for the whole test
ROOMY = {"heartbeat_interval": 1.0, "peer_timeout": 30.0}
#: many nodes in one process on a shared 2-core machine: few timers, few workers
SWARM = {"heartbeat_interval": 5.0, "peer_timeout": 20.0, "handler_concurrency": 2,
         "handshake_timeout": 10.0, "connect_timeout": 5.0}


def book(node):
    return node._pm.book


def fresh_id():
    return Identity().id


def marker(raw, nonce):
    """Ping the node and read up to its pong; return every message read before it.

    The node answers a ping from its reader, after it has handled every frame sent before
    it, so whatever those frames caused to be sent to us is among the messages returned.
    """
    raw.send({"type": "ping", "nonce": nonce})
    _, before = raw.recv_until(lambda m: m.get("type") == "pong" and m.get("nonce") == nonce)
    return before


def free_slots(node, source_ip, count, host="127.88.0.1"):
    """``count`` addresses that land in distinct, empty *new* slots of ``node``'s book when
    learned from ``source_ip``, so that a test of what is kept does not depend on a hash
    collision (the book keeps an occupant over a newcomer)."""
    b = book(node)
    source = network_group(source_ip)
    taken = set(b._new)
    found = []
    for port in range(20000, 30000):
        address = f"{host}:{port}"
        position = b._new_position(address, source)
        if position not in taken and address not in b:
            taken.add(position)
            found.append(address)
            if len(found) == count:
                return found
    raise AssertionError("no free slots")


# -- a whole network from one seed ---------------------------------------------------

def stop_and_check(nodes):
    """Stop every node, then check in one pass over the heap that none left a greenlet or a
    socket (the per-node check of :class:`NodeFactory` scans the heap once per node, which
    is slow for 50 nodes)."""
    for node in nodes:
        node.stop()
    prefixes = tuple(f"{node.tasks.name}:" for node in nodes) + tuple(
        f"listener:{node.address}:" for node in nodes)
    hosts = {node.config.listen.rpartition(":")[0] for node in nodes}
    gc.collect()
    greenlets, sockets = [], []
    for obj in gc.get_objects():
        if isinstance(obj, Greenlet) and not obj.dead and obj.name.startswith(prefixes):
            greenlets.append(obj.name)
        elif isinstance(obj, gsocket.socket):
            try:
                if obj.fileno() != -1 and obj.getsockname()[0] in hosts:
                    sockets.append(obj)
            except OSError:
                continue
    assert not greenlets, f"greenlets left after stop: {greenlets}"
    assert not sockets, f"sockets left after stop: {sockets}"


@pytest.fixture
def swarm(caplog):
    """A node factory for many nodes: quieter logs, one leak check for all of them."""
    caplog.set_level(logging.WARNING, logger="gp2p")
    factory = NodeFactory(**SWARM)
    try:
        yield factory
    finally:
        stop_and_check(factory.nodes)


def converged(nodes, target):
    """Every node has ``target`` outbound peers (or is connected to every other node) and the
    graph is one component."""
    everyone = len(nodes)
    for node in nodes:
        peers = node.peers
        if sum(p.direction == "outbound" for p in peers) < target and len(peers) < everyone - 1:
            return False
    index = {node.id: i for i, node in enumerate(nodes)}
    edges = {i: {index[p.id] for p in node.peers if p.id in index} for i, node in enumerate(nodes)}
    return connected_components(edges, list(range(everyone))) == 1


def describe(nodes, target):
    """The nodes short of ``target`` outbound peers, and why they may be stuck."""
    now = time.time()
    lines = []
    for i, node in enumerate(nodes):
        peers = node.peers
        outbound = [p for p in peers if p.direction == "outbound"]
        if len(outbound) < target and len(peers) < len(nodes) - 1:
            b = book(node)
            waiting = sum(b.retry_at(e.address) > now for e in b.entries())
            lines.append(f"#{i} {node.address}: {len(outbound)} out, {len(peers) - len(outbound)} in, "
                         f"book {len(b)} ({b.tried_count} tried, {waiting} backing off), "
                         f"dialling {len(node._dialer._dialing)}, would dial "
                         f"{node._dialer._select(outbound)}, metrics {dict(node.metrics.counters)}")
    index = {node.id: i for i, node in enumerate(nodes)}
    edges = {i: {index[p.id] for p in node.peers if p.id in index} for i, node in enumerate(nodes)}
    lines.append(f"components: {connected_components(edges, list(range(len(nodes))))}")
    return "\n".join(lines)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("seed_inbound", [125, 10], ids=["default-inbound", "seed-inbound-10"])
def test_fifty_nodes_find_each_other_from_one_seed(swarm, seed_inbound):
    n, target = 50, 8
    seed = swarm.make(listen="127.40.0.1:0", target_outbound=target, max_inbound=seed_inbound)
    # the cap holds at every moment, not only at the end: sample it at each admission
    inbound_seen = []
    seed.on_event("peer_connected")(
        lambda peer: inbound_seen.append(sum(p.direction == "inbound" for p in seed.peers)))
    started = time.monotonic()
    network = [seed] + [
        swarm.make(listen=f"127.40.{i // 250}.{i % 250 + 1}:0", bootstrap=[seed.address],
                   target_outbound=target)
        for i in range(1, n)]
    try:
        wait_until(lambda: converged(network, target), timeout=30, interval=0.05)
    except AssertionError:
        raise AssertionError(f"50 nodes did not converge:\n{describe(network, target)}") from None
    took = time.monotonic() - started
    inbound = sum(p.direction == "inbound" for p in seed.peers)
    print(f"\n50 nodes (seed max_inbound={seed_inbound}) converged in {took:.2f} s; "
          f"seed holds {inbound} inbound, evicted {seed.metrics['evicted']}")
    assert inbound <= seed_inbound and max(inbound_seen) <= seed_inbound
    for node in network:
        peers = node.peers
        outbound = sum(p.direction == "outbound" for p in peers)
        # a node connected to every other one has nobody left to dial
        assert outbound == target or len(peers) == n - 1, node
    if seed_inbound == 10:
        assert seed.metrics["evicted"] > 0  # the seed filled up and made room


# -- restart with the datadir --------------------------------------------------------

def test_node_restarted_with_its_datadir_and_no_seed_rejoins(nodes, tmp_path):
    hub = nodes.make(**ROOMY)
    others = [nodes.make(**ROOMY) for _ in range(3)]
    for other in others:
        other.connect(hub.address)
    host = next_host()
    datadir = str(tmp_path / "x")
    x = nodes.make(listen=f"{host}:0", datadir=datadir, bootstrap=[hub.address], target_outbound=2,
                   **ROOMY)
    wait_until(lambda: sum(p.direction == "outbound" for p in x.peers) == 2, timeout=10)
    outbound = {p.dialed_address for p in x.peers if p.direction == "outbound"}
    x_id = x.id
    x.stop()
    path = os.path.join(datadir, "addressbook.json")
    assert os.path.exists(path)
    saved = load(path)
    assert sorted(saved.anchors) == sorted(outbound)
    assert len(saved) >= 2

    again = nodes.make(listen=f"{host}:0", datadir=datadir, target_outbound=2, **ROOMY)
    assert again.id == x_id and not again.config.bootstrap
    assert len(book(again)) >= len(saved)
    wait_until(lambda: sum(p.direction == "outbound" for p in again.peers) == 2, timeout=10)
    # the anchors were dialled first: with a target of 2, nothing else was needed
    assert {p.dialed_address for p in again.peers if p.direction == "outbound"} == outbound
    assert again.metrics["dial_failed"] == 0


# -- getaddr -------------------------------------------------------------------------

def test_getaddr_is_answered_once_per_connection_per_interval(nodes):
    a = nodes.make(**ROOMY)
    others = [nodes.make(**ROOMY) for _ in range(3)]
    for other in others:
        other.connect(a.address)
    wait_until(lambda: len(book(a)) == 3 and a.metrics["discovery.getaddr_answered"] == 3)
    raw = RawPeer.dial(a.address).handshake()
    raw.send({"type": "getaddr"})
    raw.send({"type": "getaddr"})
    seen = marker(raw, 7)
    answers = [m for m in seen if m.get("type") == "addr" and m.get("reply") is True]
    assert len(answers) == 1
    # a small book is answered whole (the quarter rule has a floor of ANSWER_FLOOR)
    assert {e["address"] for e in answers[0]["addrs"]} == {o.address for o in others}
    assert a.metrics["discovery.getaddr_answered"] == 4
    assert a.metrics["discovery.getaddr_ignored"] == 1
    # the self-announcement came too, once, without the reply mark
    own = [m for m in seen if m.get("type") == "addr" and "reply" not in m]
    assert [m["addrs"][0]["address"] for m in own] == [a.address]
    assert own[0]["addrs"][0]["id"] == a.id
    # a new connection gets its own answer
    other = RawPeer.dial(a.address).handshake()
    other.send({"type": "getaddr"})
    assert sum(m.get("reply") is True for m in marker(other, 8)) == 1
    raw.close()
    other.close()


@pytest.mark.parametrize("extra", [0, 200], ids=["small-book", "large-book"])
def test_getaddr_answer_leaves_out_the_asker_without_shrinking(nodes, extra):
    a = nodes.make(**ROOMY)
    for _ in range(3):
        nodes.make(**ROOMY).connect(a.address)
    wait_until(lambda: len(book(a)) == 3)
    for i in range(extra):  # heard of from many networks, so that few collide
        book(a).add(f"127.94.{i}.1:4242", None, f"127.{100 + i % 100}.{i}.1", time.time())
    claimed = "127.98.1.1:4242"
    for attempt in range(12):
        # each asker claims the same listen address, so the book holds it among the others
        raw = RawPeer.dial(a.address)
        raw.local.listen = claimed
        raw.handshake()
        raw.send({"type": "getaddr"})
        [answer] = [m for m in marker(raw, attempt) if m.get("reply") is True]
        size = len(book(a))
        assert book(a).get(claimed).node_id == raw.identity.id
        # a quarter of the book, but at least ANSWER_FLOOR: never one short for the asker
        expected = min(size - 1, max(ANSWER_FLOOR, math.ceil(ANSWER_FRACTION * size)))
        assert len(answer["addrs"]) == expected, attempt
        assert claimed not in {e["address"] for e in answer["addrs"]}
        raw.close()
        wait_until(lambda: len(a.peers) == 3)


def test_outbound_handshake_asks_getaddr_and_learns_the_answer(nodes):
    a = nodes.make(**ROOMY)
    known = [nodes.make(**ROOMY) for _ in range(4)]
    for other in known:
        other.connect(a.address)
    wait_until(lambda: len(book(a)) == 4 and a.metrics["discovery.getaddr_answered"] == 4)
    b = nodes.make(**ROOMY)
    b.connect(a.address)
    wait_until(lambda: b.metrics["discovery.learned"] >= 1)
    assert a.metrics["discovery.getaddr_answered"] == 5
    learned = {e.address for e in book(b).entries()} - {a.address}
    assert learned and learned <= {n.address for n in known}
    assert all(not book(b).get(address).tried for address in learned)
    assert b.metrics["discovery.rate_limited"] == 0


# -- unsolicited addr ----------------------------------------------------------------

def entries(addresses, seen=None):
    seen = time.time() if seen is None else seen
    return [{"address": address, "id": None, "seen": seen} for address in addresses]


@pytest.mark.parametrize("forged_reply", [False, True], ids=["plain", "forged-reply"])
def test_unsolicited_addr_is_rate_limited_per_peer(nodes, forged_reply):
    a = nodes.make(**ROOMY)
    raw = RawPeer.dial(a.address).handshake()
    extra = 150
    addresses = [f"127.{90 + i // 60000}.{(i // 250) % 240}.{i % 250 + 1}:{7000 + i % 7}"
                 for i in range(int(ADDR_BURST) + extra)]
    chunks = [addresses[i:i + 500] for i in range(0, len(addresses), 500)]
    started = time.monotonic()
    for chunk in chunks:
        msg = {"type": "addr", "addrs": entries(chunk)}
        if forged_reply:
            msg["reply"] = True  # we never asked this inbound peer: it is still unsolicited
        raw.send(msg)
    marker(raw, 1)
    # tokens trickle back at ADDR_RATE per second while the test runs
    refill = math.ceil((time.monotonic() - started) * ADDR_RATE) + 1
    limited = a.metrics["discovery.rate_limited"]
    assert extra - refill <= limited <= extra
    assert not any(address in book(a) for address in addresses[-(extra - refill):])
    assert a.metrics["discovery.malformed"] == 0
    assert [p.id for p in a.peers] == [raw.identity.id]  # rate-limited, not disconnected
    raw.close()


def test_rate_limit_is_per_peer(nodes):
    a = nodes.make(**ROOMY)
    first = RawPeer.dial(a.address, source="127.91.0.2").handshake()
    burst = [f"127.94.{i // 250}.{i % 250 + 1}:7000" for i in range(int(ADDR_BURST))]
    for i in range(0, len(burst), MAX_ADDR_ENTRIES):
        first.send({"type": "addr", "addrs": entries(burst[i:i + MAX_ADDR_ENTRIES])})
    first.send({"type": "addr", "addrs": entries(f"127.95.0.{i}:7000" for i in range(1, 6))})
    marker(first, 1)
    limited = a.metrics["discovery.rate_limited"]
    assert limited >= 4  # the first has spent its burst (a token may have trickled back)
    # from another /16: the first one's flood filled the buckets its own group can reach
    second = RawPeer.dial(a.address, source="127.92.0.2").handshake()
    [address] = free_slots(a, second.source, 1, host="127.93.0.1")
    second.send({"type": "addr", "addrs": entries([address])})
    marker(second, 2)
    assert a.metrics["discovery.rate_limited"] == limited
    assert address in book(a)
    first.close()
    second.close()


def test_oversized_addr_disconnects_and_discourages_the_ip(nodes):
    a = nodes.make(**ROOMY)
    b = nodes.make(**ROOMY)
    b.connect(a.address)
    ip = next_host()
    raw = RawPeer.dial(a.address, source=ip).handshake()
    raw.send({"type": "addr", "addrs": entries(
        f"127.94.{i // 250}.{i % 250 + 1}:7000" for i in range(MAX_ADDR_ENTRIES + 1))})
    msg, _ = raw.recv_until(lambda m: m.get("type") == "disconnect")
    assert disconnect_reason(msg) == DisconnectReason.PROTOCOL_ERROR
    assert raw.wait_closed() == b""
    wait_until(lambda: a.metrics["disconnects.PROTOCOL_ERROR"] == 1)
    assert a.metrics["discouraged"] == 1
    assert not any(f"127.94.0.{i}:7000" in book(a) for i in range(1, 251))
    # the same source IP is now refused at accept, before its handshake
    again = RawPeer.dial(a.address, source=ip)
    assert again.wait_closed() == b""
    assert a.metrics["refused.banned"] == 1
    assert a._pm.is_banned(ip)  # which also keeps it out of our own dials
    # other peers are unaffected, and a discouraged IP is no manual ban
    assert [p.id for p in a.peers] == [b.id]
    assert a.banned == {}


def test_malformed_entries_are_skipped_and_good_ones_kept(nodes):
    a = nodes.make(**ROOMY)
    raw = RawPeer.dial(a.address).handshake()
    good = free_slots(a, raw.source, 3, host="127.95.0.1")
    now = time.time()
    bad = [
        "not a map",
        42,
        None,
        {"id": None, "seen": now},                                 # no address
        {"address": "nonsense", "seen": now},
        {"address": "127.95.0.2:0", "seen": now},                  # port 0
        {"address": "0.0.0.0:7000", "seen": now},                  # unspecified
        {"address": "224.0.0.1:7000", "seen": now},                # multicast
        {"address": 7000, "seen": now},
        {"address": "127.95.0.3:7000", "id": "not-an-id", "seen": now},
        {"address": "127.95.0.4:7000", "id": None, "seen": "yesterday"},
        {"address": "127.95.0.5:7000", "id": None, "seen": True},
        {"address": "127.95.0.6:7000", "id": None, "seen": float("nan")},
        {"address": "127.95.0.7:7000", "id": None, "seen": float("inf")},
    ]
    node_id = fresh_id()
    addrs = ([{"address": good[0], "id": node_id, "seen": now}] + bad[:7]
             + [{"address": good[1], "id": None, "seen": now - 5}] + bad[7:]
             + [{"address": good[2]}])  # id and seen are optional
    raw.send({"type": "addr", "addrs": addrs})
    marker(raw, 1)
    assert a.metrics["discovery.malformed"] == len(bad)
    assert all(address in book(a) for address in good)
    assert book(a).get(good[0]).node_id == node_id
    for i in range(2, 8):
        assert f"127.95.0.{i}:7000" not in book(a)
    assert [p.id for p in a.peers] == [raw.identity.id]  # skipped, not a violation
    raw.close()


# -- relay ---------------------------------------------------------------------------

def test_fresh_addresses_are_relayed_to_peers_that_never_asked(nodes):
    a = nodes.make(**ROOMY)
    b, c = nodes.make(**ROOMY), nodes.make(**ROOMY)
    # a dials them, so b and c are acceptors: they never send a getaddr to a
    a.connect(b.address)
    a.connect(c.address)
    # markers from b and c arrive after their self-announcements, which a may relay
    marks = []
    a.on("mark")(lambda peer, payload: marks.append(payload))
    b.send(a.id, "mark", "b")
    c.send(a.id, "mark", "c")
    wait_until(lambda: sorted(marks) == ["b", "c"])
    relayed = a.metrics["discovery.relayed"]
    raw = RawPeer.dial(a.address).handshake()
    announced, node_id = "127.96.0.1:4242", fresh_id()
    raw.send({"type": "addr", "addrs": [{"address": announced, "id": node_id, "seen": time.time()}]})
    wait_until(lambda: announced in book(b) and announced in book(c))
    assert book(b).get(announced).node_id == node_id and not book(b).get(announced).tried
    assert book(b).get(announced).source == network_group(a.address.rpartition(":")[0])
    assert b.metrics["discovery.getaddr_answered"] == 1 and c.metrics["discovery.getaddr_answered"] == 1
    assert a.metrics["discovery.getaddr_answered"] == 0  # nobody asked a
    assert a.metrics["discovery.relayed"] == relayed + 2
    # the raw source is not sent its own announcement back
    assert not any(m.get("type") == "addr" and m["addrs"][0]["address"] == announced
                   for m in marker(raw, 1))
    raw.close()


def test_relays_to_a_congested_peer_are_dropped_and_counted_not_slow_peer(nodes):
    a = nodes.make(**ROOMY, max_frame_size=65536, out_queue_bytes=256 * 1024)
    stuck = RawPeer.dial(a.address).handshake()  # never reads from here on
    wait_until(lambda: stuck.identity.id in {p.id for p in a.peers})
    peer = next(p for p in a.peers if p.id == stuck.identity.id)
    # fill the kernel buffers, then a's out-queue to over half of out_queue_bytes (but not
    # over all of it, which would be SLOW_PEER): optional traffic must now stay away
    while not peer.congested:
        a.send(peer, "blob", bytes(60_000))
        gevent.idle()  # the writer moves what the kernel takes before we queue more
    source = RawPeer.dial(a.address).handshake()
    announced = "127.96.0.9:4242"
    source.send({"type": "addr", "addrs": [{"address": announced, "id": fresh_id(), "seen": time.time()}]})
    wait_until(lambda: a.metrics["discovery.relay_dropped"] == 1)
    assert announced in book(a) and a.metrics["discovery.relayed"] == 1
    assert peer in a.peers and peer.congested and a.metrics["disconnects.SLOW_PEER"] == 0
    stuck.close()
    source.close()


def test_stale_and_large_addr_messages_are_not_relayed(nodes):
    a = nodes.make(**ROOMY)
    b = nodes.make(**ROOMY)
    a.connect(b.address)
    raw = RawPeer.dial(a.address).handshake()
    stale = "127.97.0.1:4242"
    raw.send({"type": "addr", "addrs": entries([stale], seen=time.time() - 3600)})
    crowd = [f"127.97.1.{i}:4242" for i in range(1, 12)]   # more than a small announcement
    raw.send({"type": "addr", "addrs": entries(crowd)})
    marker(raw, 1)
    assert stale in book(a)
    assert a.metrics["discovery.relayed"] == 0
    # b got nothing: a marker from a to b arrives after anything a relayed before it
    got = []
    b.on("mark")(lambda peer, payload: got.append(payload))
    a.send(b.id, "mark", 1)
    wait_until(lambda: got == [1])
    assert stale not in book(b) and not any(address in book(b) for address in crowd)
    raw.close()


def test_only_news_is_relayed_and_relays_to_a_peer_share_a_message(nodes):
    a = nodes.make(**ROOMY)
    source = RawPeer.dial(a.address).handshake()
    target = RawPeer.dial(a.address).handshake()
    wait_until(lambda: len(a.peers) == 2)
    marker(source, 1)
    news = [f"127.95.0.{i}:4242" for i in range(1, 4)]
    source.send({"type": "addr", "addrs": entries(news)})
    marker(source, 2)
    assert a.metrics["discovery.relayed"] == 3  # each to the one other peer
    # they reach the target together, in one addr message, within the relay interval
    msg, _ = target.recv_until(lambda m: m.get("type") == "addr"
                                         and any(e["address"] in news for e in m["addrs"]), timeout=5)
    assert sorted(e["address"] for e in msg["addrs"]) == news
    # an address the node knew already (here from a message too big to relay) is not
    # passed on when it is announced: it has been spreading without this node
    crowd = [f"127.95.1.{i}:4242" for i in range(1, 12)]
    source.send({"type": "addr", "addrs": entries(crowd)})
    marker(source, 3)
    assert crowd[0] in book(a) and a.metrics["discovery.relayed"] == 3
    source.send({"type": "addr", "addrs": entries(crowd[:1])})
    marker(source, 4)
    assert a.metrics["discovery.relayed"] == 3
    source.close()
    target.close()


def test_a_node_with_a_well_stocked_book_does_not_ask_every_new_peer(nodes):
    a = nodes.make(**ROOMY, max_addresses=64)
    b = nodes.make(**ROOMY)
    a.connect(b.address)  # an empty book: ask
    wait_until(lambda: b.metrics["discovery.getaddr_answered"] == 1)
    # heard of from many different networks, so nothing collides
    for i in range(1, 200):
        if len(book(a)) >= book(a).capacity // 2:
            break
        book(a).add(f"127.94.{i}.1:4242", None, f"127.{100 + i % 100}.{i}.1", time.time())
    assert len(book(a)) >= book(a).capacity // 2
    c = nodes.make(**ROOMY)
    a.connect(c.address)  # half full: do not ask
    got = []
    c.on("mark")(lambda peer, payload: got.append(payload))
    a.send(c.id, "mark", 1)  # sent after the getaddr a would have sent
    wait_until(lambda: got == [1])
    assert c.metrics["discovery.getaddr_answered"] == 0


def test_only_the_first_outbound_peers_are_asked_for_addresses(nodes):
    a = nodes.make(**ROOMY)
    others = [nodes.make(**ROOMY) for _ in range(ASK_SOURCES + 2)]
    got = {}
    for other in others:
        a.connect(other.address)
        other.on("mark")(lambda peer, payload, other=other: got.setdefault(other.id, payload))
    for other in others:
        a.send(other.id, "mark", 1)  # sent after the getaddr a would have sent
    wait_until(lambda: len(got) == len(others))
    answered = [o.metrics["discovery.getaddr_answered"] for o in others]
    assert answered == [1] * ASK_SOURCES + [0, 0]


def test_getaddr_askers_within_the_cache_time_get_the_same_sample(nodes):
    a = nodes.make(**ROOMY)
    for i in range(200):  # heard of from many networks, so that few collide
        book(a).add(f"127.94.{i}.1:4242", None, f"127.{100 + i % 100}.{i}.1", time.time())
    answers = []
    for attempt in range(3):
        raw = RawPeer.dial(a.address).handshake()
        raw.send({"type": "getaddr"})
        [answer] = [m for m in marker(raw, attempt) if m.get("reply") is True]
        answers.append({e["address"] for e in answer["addrs"]})
        raw.close()
    assert len(answers[0]) == math.ceil(ANSWER_FRACTION * len(book(a))) < len(book(a))
    assert answers[0] == answers[1] == answers[2]
    assert a.metrics["discovery.answer_sampled"] == 1


def test_a_node_short_of_peers_asks_again_and_finds_a_later_joiner(nodes, monkeypatch):
    # everyone it asked answered before the newcomer existed, and no relay can tell it: the
    # seed learns the newcomer from its hello, so the self-announcement is not news to relay
    monkeypatch.setattr("gp2p.discovery.REASK_AFTER", 0.3)
    monkeypatch.setattr("gp2p.discovery.ANSWER_INTERVAL", 0.2)
    monkeypatch.setattr("gp2p.dialer.IDLE_CHECK", 0.1)
    seed = nodes.make(**ROOMY)
    a = nodes.make(**ROOMY, target_outbound=2, bootstrap=[seed.address])
    wait_until(lambda: seed.metrics["discovery.getaddr_answered"] == 1 and len(a.peers) == 1)
    later = nodes.make(**ROOMY)
    later.connect(seed.address)
    wait_until(lambda: later.address in book(seed))
    wait_until(lambda: later.id in {p.id for p in a.peers}, timeout=10)
    assert a.metrics["discovery.asked_again"] >= 1
    assert seed.metrics["discovery.getaddr_answered"] >= 2
    assert seed.metrics["discovery.relayed"] == 0


# -- self-announcement ---------------------------------------------------------------

def test_self_announced_address_stays_new_until_our_own_dial_succeeds(nodes):
    a, b = nodes.make(**ROOMY), nodes.make(**ROOMY)
    peer = b.connect(a.address)
    wait_until(lambda: b.address in book(a))
    entry = book(a).get(b.address)
    assert not entry.tried and not entry.last_success
    assert entry.node_id == b.id
    # a claim from a peer that does not listen there stays new as well
    raw = RawPeer.dial(a.address)
    raw.local.listen = "127.98.0.1:4242"
    raw.handshake()
    marker(raw, 1)
    assert not book(a).get("127.98.0.1:4242").tried
    raw.close()
    # b's connection goes; a then dials b itself, and only that verifies the address
    peer.close(DisconnectReason.SHUTDOWN)
    wait_until(lambda: not a.peers)
    assert not book(a).get(b.address).tried
    a.connect(b.address)
    entry = book(a).get(b.address)
    assert entry.tried and entry.last_success


# -- TokenBucket (pure) --------------------------------------------------------------

def test_token_bucket_starts_full_and_refills_at_its_rate():
    bucket = TokenBucket(rate=2.0, burst=3.0, now=100.0)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(100.4)          # 0.8 tokens
    assert bucket.take(100.5)              # 1.0
    assert not bucket.take(100.5)
    assert bucket.take(200.0, 3.0)         # refilled, capped at burst
    assert not bucket.take(200.0)


def test_token_bucket_take_n_spends_all_or_nothing():
    bucket = TokenBucket(rate=1.0, burst=5.0, now=0.0)
    assert not bucket.take(0.0, 6.0)
    assert bucket.tokens == 5.0
    assert bucket.take(0.0, 4.5) and not bucket.take(0.0, 1.0)
    assert bucket.take(0.5, 1.0)


def test_token_bucket_ignores_a_clock_that_goes_back():
    bucket = TokenBucket(rate=1.0, burst=2.0, now=50.0)
    assert bucket.take(50.0) and bucket.take(50.0)
    assert not bucket.take(10.0)
    assert not bucket.take(50.5)           # going back gave nothing, and moved nothing
    assert bucket.take(51.0)


@settings(max_examples=200, deadline=None)
@given(rate=st.floats(0.0, 100.0), burst=st.floats(1.0, 1000.0),
       steps=st.lists(st.tuples(st.floats(0.0, 10.0), st.floats(0.1, 50.0)), max_size=60))
def test_token_bucket_never_grants_more_than_burst_plus_rate_times_elapsed(rate, burst, steps):
    bucket = TokenBucket(rate, burst, now=0.0)
    now = granted = 0.0
    for dt, n in steps:
        now += dt
        if bucket.take(now, n):
            granted += n
        assert 0.0 <= bucket.tokens <= burst
        assert granted <= burst + rate * now + 1e-6
