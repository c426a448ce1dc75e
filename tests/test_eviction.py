"""Connection limits: eviction when inbound slots are full, and the per-IP and handshake caps.

:func:`~gp2p.eviction.choose_eviction` is pure and gets property tests; one loopback test
shows a full node evicting from its crowded network group while the peers it protects stay,
and hypothesis drives the caps over small limits with raw sockets.
"""
import time
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gp2p import DisconnectReason, PeerGone, addressbook
from gp2p.eviction import Candidate, choose_eviction
from gp2p.testing import NodeFactory, RawPeer, next_host, wait_until

#: no heartbeat during a test, so the only RTT samples are the ones a test makes; a RawPeer
#: that does not answer pings stays connected
QUIET = {"heartbeat_interval": 30.0, "peer_timeout": 60.0, "handshake_timeout": 10.0}


# -- choose_eviction (pure) ----------------------------------------------------------

@st.composite
def candidates(draw, min_size=0, max_size=40, measured=True):
    """Inbound peers with distinct connection times, RTTs and useful times (some missing)."""
    n = draw(st.integers(min_size, max_size))
    started = draw(st.permutations(range(n)))
    rtts = draw(st.permutations(range(n)))
    useful = draw(st.permutations(range(n)))
    has_rtt = draw(st.lists(st.booleans(), min_size=n, max_size=n)) if measured else [False] * n
    was_useful = draw(st.lists(st.booleans(), min_size=n, max_size=n)) if measured else [False] * n
    groups = draw(st.lists(st.sampled_from(["127.1.0.0/16", "127.2.0.0/16", "127.3.0.0/16"]),
                           min_size=n, max_size=n))
    return [Candidate(key=i, connected_at=1000.0 + started[i],
                      rtt=(rtts[i] + 1) / 1000 if has_rtt[i] else None,
                      last_useful=2000.0 + useful[i] if was_useful[i] else None,
                      group=groups[i])
            for i in range(n)]


def share(pool):
    """How many peers each of the RTT and useful classes protects."""
    return min(4, len(pool) // 4)


@settings(max_examples=300, deadline=None)
@given(candidates())
def test_someone_is_evicted_from_any_non_empty_set_and_never_a_protected_peer(pool):
    key = choose_eviction(pool)
    if not pool:
        assert key is None
        return
    by_key = {c.key: c for c in pool}
    assert key in by_key  # small nodes evict too: protection never covers everyone
    victim = by_key[key]
    k = share(pool)
    # never one of the k lowest round-trip times
    fastest = sorted((c for c in pool if c.rtt is not None), key=lambda c: c.rtt)[:k]
    assert victim not in fastest
    # never one of the k that most recently delivered useful messages
    useful = sorted((c for c in pool if c.last_useful is not None), key=lambda c: -c.last_useful)[:k]
    assert victim not in useful
    # never among the longest-connected: at least half of what the first two classes left
    # is older than the victim
    older = sum(c.connected_at < victim.connected_at for c in pool)
    assert older >= (len(pool) - 2 * k) // 2
    if len(pool) > 1:
        assert older >= 1  # the longest-connected peer is never the one


@settings(max_examples=300, deadline=None)
@given(candidates(min_size=1, measured=False))
def test_without_measurements_the_most_crowded_group_of_the_newer_half_loses_its_newest(pool):
    key = choose_eviction(pool)
    # nothing measured: only the longest-connected half is protected
    newer = sorted(pool, key=lambda c: c.connected_at)[len(pool) // 2:]
    sizes = Counter(c.group for c in newer)
    victim = next(c for c in pool if c.key == key)
    assert victim in newer
    assert sizes[victim.group] == max(sizes.values())
    assert victim.connected_at == max(c.connected_at for c in newer if c.group == victim.group)
    # among equally crowded groups, the one with the newest connection
    tied = [c for c in newer if sizes[c.group] == sizes[victim.group]]
    assert victim.connected_at == max(c.connected_at for c in tied)


def test_eviction_examples():
    def cand(key, at, group, rtt=None, useful=None):
        return Candidate(key, at, rtt, useful, group)

    # 8 peers: 2 protected for RTT, 2 for useful messages, 2 of the other 4 for uptime
    pool = [cand("old-a", 1, "A"), cand("old-b", 2, "B"),
            cand("fast-1", 3, "A", rtt=0.001), cand("fast-2", 8, "A", rtt=0.002),
            cand("useful-1", 4, "A", useful=50), cand("useful-2", 7, "A", useful=60),
            cand("b-new", 6, "B"), cand("a-new", 5, "A")]
    # left: b-new (B) and a-new (A): a tie of one each, broken by the newest connection
    assert choose_eviction(pool) == "b-new"
    # one more A among the unprotected makes A the crowded group
    pool.append(cand("a-newer", 9, "A", rtt=0.5))
    assert choose_eviction(pool) == "a-newer"
    assert choose_eviction([]) is None
    assert choose_eviction([cand("only", 1, "A", rtt=0.001, useful=1)]) == "only"


# -- eviction on loopback ------------------------------------------------------------

def test_a_full_node_evicts_an_unprotected_peer_of_the_crowded_group(nodes):
    a = nodes.make(listen="127.50.0.1:0", max_inbound=10, **QUIET)
    crowded, other = "127.51.0", "127.52.0"
    plan = [  # in connection order; 7 peers from the crowded /16, 3 from the other
        ("old-1", other), ("old-2", crowded), ("old-3", other),
        ("fast-1", crowded), ("useful-1", crowded),
        ("other-new", other), ("crowded-1", crowded), ("crowded-2", crowded),
        ("fast-2", crowded), ("useful-2", crowded),
    ]
    peers = {}
    for i, (name, net) in enumerate(plan):
        node = nodes.make(listen=f"{net}.{i + 2}:0", **QUIET)
        node.connect(a.address)
        peers[name] = node
    assert len(a.peers) == 10
    # round-trip samples for two of them, useful messages from two others
    for name in ("fast-1", "fast-2"):
        a._pm.by_id[peers[name].id].ping(timeout=5)
    got = []
    a.on("work")(lambda peer, payload: got.append(payload))
    for name in ("useful-1", "useful-2"):
        peers[name].send(a.id, "work", name)
    wait_until(lambda: sorted(got) == ["useful-1", "useful-2"])
    reasons = {name: [] for name in peers}
    for name, node in peers.items():
        node.on_event("peer_disconnected")(lambda peer, reason, name=name: reasons[name].append(reason))

    newcomer = nodes.make(listen="127.53.0.2:0", **QUIET)
    newcomer.connect(a.address)
    # protected: 2 fastest, 2 most recently useful, then the older half of the other 6
    # (old-1..3); left: other-new, crowded-1, crowded-2 -> the crowded group, its newest
    wait_until(lambda: reasons["crowded-2"] == [DisconnectReason.EVICTED])
    assert a.metrics["evicted"] == 1
    assert {p.id for p in a.peers} == {n.id for n in peers.values()} - {peers["crowded-2"].id} | {newcomer.id}
    assert sum(p.direction == "inbound" for p in a.peers) == 10
    # the newest peers of the crowded group were protected for their RTT and usefulness
    assert all(not reasons[name] for name in peers if name != "crowded-2")


# -- caps at the boundary ------------------------------------------------------------

@settings(max_examples=10, deadline=None)
@given(limit=st.integers(1, 4), ready=st.integers(0, 2))
def test_handshake_cap_admits_exactly_max_pending(limit, ready):
    factory = NodeFactory(**QUIET)
    raws = []
    try:
        a = factory.make(max_pending=limit)
        # peers past their handshake do not count as pending
        raws += [RawPeer.dial(a.address).handshake() for _ in range(ready)]
        pending = [RawPeer.dial(a.address) for _ in range(limit)]  # connected, silent
        raws += pending
        wait_until(lambda: a._pm.pending == limit)
        extra = RawPeer.dial(a.address)
        raws.append(extra)
        assert extra.wait_closed() == b""  # closed at accept, nothing written
        assert a.metrics["refused.pending"] == 1
        # exactly the limit got in: every waiting socket completes its handshake
        for raw in pending:
            assert raw.handshake().info.id == a.id
        wait_until(lambda: len(a.peers) == ready + limit and a._pm.pending == 0)
        # slots free again
        raws.append(RawPeer.dial(a.address).handshake())
        assert a.metrics["refused.pending"] == 1
    finally:
        for raw in raws:
            raw.close()
        factory.stop_all()


@settings(max_examples=10, deadline=None)
@given(limit=st.integers(1, 4), others=st.integers(0, 2))
def test_per_ip_cap_admits_exactly_max_per_ip(limit, others):
    factory = NodeFactory(**QUIET)
    raws = []
    try:
        a = factory.make(max_per_ip=limit)
        ip = next_host()
        # sockets from other IPs do not count
        raws += [RawPeer.dial(a.address).handshake() for _ in range(others)]
        # ready peers and pending sockets from one IP both count
        same = [RawPeer.dial(a.address, source=ip).handshake() for _ in range(limit - 1)]
        last = RawPeer.dial(a.address, source=ip)
        raws += same + [last]
        wait_until(lambda: a._pm._per_ip[ip] == limit)
        extra = RawPeer.dial(a.address, source=ip)
        raws.append(extra)
        assert extra.wait_closed() == b""
        assert a.metrics["refused.per_ip"] == 1
        assert last.handshake().info.id == a.id
        # another IP still gets in
        raws.append(RawPeer.dial(a.address).handshake())
        wait_until(lambda: len(a.peers) == others + limit + 1)
        assert a.metrics["refused.per_ip"] == 1
    finally:
        for raw in raws:
            raw.close()
        factory.stop_all()


def test_refused_dialer_sees_a_closed_socket_not_a_handshake(nodes):
    a = nodes.make(max_per_ip=1, **QUIET)
    host = next_host()
    b = nodes.make(listen=f"{host}:0", **QUIET)
    held = RawPeer.dial(a.address, source=host)
    wait_until(lambda: a._pm._per_ip[host] == 1)
    with pytest.raises(PeerGone):  # closed at accept: no handshake, so no reason either
        b.connect(a.address)
    assert a.metrics["refused.per_ip"] == 1
    held.close()
    wait_until(lambda: host not in a._pm._per_ip)
    assert b.connect(a.address).id == a.id


def test_an_evicted_peer_is_handed_addresses_before_its_disconnect(nodes):
    from gp2p.testing import RawPeer

    a = nodes.make(max_inbound=1)
    for port in range(7001, 7006):
        a._pm.book.add(f"127.77.0.1:{port}", None, "127.66.0.1", time.time())
    raw = RawPeer.dial(a.address).handshake()
    try:
        wait_until(lambda: len(a.peers) == 1)
        nodes.make().connect(a.address)  # the newcomer evicts the raw peer
        bye, before = raw.recv_until(lambda m: m.get("type") == "disconnect")
        assert DisconnectReason.from_wire(bye["reason"]) == DisconnectReason.EVICTED
        handed = {e["address"] for m in before if m.get("type") == "addr" for e in m["addrs"]}
        assert {f"127.77.0.1:{port}" for port in range(7001, 7006)} <= handed
    finally:
        raw.close()


def test_an_evicted_dialer_backs_off_before_redialling(nodes, monkeypatch):
    # without a backoff, nodes that know only a full node evict each other from it as fast
    # as they can redial it (hundreds of evictions a second)
    monkeypatch.setattr(addressbook, "EVICTED_BASE", 0.5)  # 15 s by default
    a = nodes.make(max_inbound=1, **QUIET)
    b = nodes.make(bootstrap=[a.address], **QUIET)
    log = []
    b.on_event("peer_connected")(lambda peer: log.append(("up", time.monotonic())))
    b.on_event("peer_disconnected")(lambda peer, reason: log.append((reason, time.monotonic())))
    wait_until(lambda: len(log) == 1)
    newcomer = nodes.make(**QUIET)
    newcomer.connect(a.address)
    wait_until(lambda: len(log) == 2)
    assert log[1][0] == DisconnectReason.EVICTED
    assert b._pm.book.get(a.address).tried  # still a good address, only backing off
    # b comes back (its seed is all it knows), but only after the backoff: at least 0.5 s
    wait_until(lambda: len(log) == 3, timeout=10)
    assert log[2][0] == "up" and log[2][1] - log[1][1] >= 0.45
    wait_until(lambda: [p.id for p in a.peers] == [b.id])
    assert a.metrics["evicted"] == 2  # the newcomer made way in turn, and does not redial

