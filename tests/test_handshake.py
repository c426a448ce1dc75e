"""The handshake between real nodes: identity, networks, self and duplicate connections."""
import gevent
import pytest

from gp2p import DisconnectReason, HandshakeError
from gp2p.testing import wait_until


def test_connect_returns_ready_peer_and_acceptor_already_lists_it(nodes):
    a, b = nodes.make(), nodes.make()
    peer = b.connect(a.address)
    assert peer.id == a.id and peer.direction == "outbound" and peer.address == a.address
    # the acceptor admitted us before it sent its ack
    assert [p.id for p in a.peers] == [b.id]
    assert a.peers[0].direction == "inbound" and a.peers[0].address == b.address
    # outbound sockets come from the node's own listen host
    assert a.peers[0].remote_ip == b.address.split(":")[0]


def test_wrong_network_is_refused_on_both_sides(nodes):
    a, b = nodes.make(network_id="net-a"), nodes.make(network_id="net-b")
    with pytest.raises(HandshakeError) as info:
        b.connect(a.address)
    assert info.value.reason == DisconnectReason.WRONG_NETWORK
    wait_until(lambda: a.metrics["handshake_failed.WRONG_NETWORK"] == 1)
    assert not a.peers and not b.peers


def test_self_connection_is_detected_and_address_never_dialled_again(nodes):
    # advertising another address hides the real one from the cheap pre-check, so the
    # handshake itself must notice that it reached its own node id
    node = nodes.make(advertise="127.9.9.9:1")
    real = node._listener.address
    with pytest.raises(HandshakeError) as info:
        node.connect(real)
    assert info.value.reason == DisconnectReason.SELF_CONNECTION
    assert real in node._pm.own_addresses
    dials = node.metrics["handshake_failed.SELF_CONNECTION"]
    with pytest.raises(HandshakeError):
        node.connect(real)
    assert node.metrics["handshake_failed.SELF_CONNECTION"] == dials  # not dialled again
    assert not node.peers


def test_json_and_msgpack_nodes_talk(nodes):
    a = nodes.make(codec="json")
    b = nodes.make(codec="msgpack")
    got = []
    a.on("k")(lambda peer, payload: got.append(payload))
    b.connect(a.address)
    b.send(a.id, "k", {"bytes": b"\x00\x01", "list": [1, 2.5, None, True], "s": "é"})
    wait_until(lambda: got)
    assert got == [{"bytes": b"\x00\x01", "list": [1, 2.5, None, True], "s": "é"}]


def test_second_connect_returns_the_surviving_peer(nodes):
    a, b = nodes.make(), nodes.make()
    first = b.connect(a.address)
    assert b.connect(a.address) is first  # known address: no second dial
    # a dial back from the other side is a duplicate too
    back = a.connect(b.address)
    assert back.id == b.id
    wait_until(lambda: len(a._pm.connections) == 1 and len(b._pm.connections) == 1)
    assert len(a.peers) == 1 and len(b.peers) == 1


def _events(node):
    log = []
    node.on_event("peer_connected")(lambda p: log.append(("up", p.id)))
    node.on_event("peer_disconnected")(lambda p, r: log.append(("down", p.id, r)))
    return log


@pytest.mark.parametrize("round_", range(3))
def test_simultaneous_dials_end_with_one_connection_and_no_visible_swap(nodes, round_):
    pairs = []
    for _ in range(5):
        a, b = nodes.make(), nodes.make()
        pairs.append((a, b, _events(a), _events(b)))
    dials = []
    for a, b, _, _ in pairs:
        dials.append(gevent.spawn(a.connect, b.address))
        dials.append(gevent.spawn(b.connect, a.address))
    gevent.joinall(dials, timeout=10, raise_error=True)
    for a, b, log_a, log_b in pairs:
        wait_until(lambda: len(a._pm.connections) == 1 and len(b._pm.connections) == 1
                   and not a._pm._deferred and not b._pm._deferred, timeout=10)
        assert [p.id for p in a.peers] == [b.id] and [p.id for p in b.peers] == [a.id]
        # the survivor is the connection dialled by the smaller id, on both sides
        dialer = min(a.id, b.id)
        assert a.peers[0].dialer_id == dialer and b.peers[0].dialer_id == dialer
        # marker: a message sent now arrives after any event of the swap
        got = []
        b.on("marker")(lambda peer, payload: got.append(payload))
        a.send(b.id, "marker", 1)
        wait_until(lambda: got == [1])
        wait_until(lambda: log_a and log_b)
        assert log_a == [("up", b.id)] and log_b == [("up", a.id)]


def test_peer_disconnected_once_when_the_last_connection_goes(nodes):
    a, b = nodes.make(), nodes.make()
    log_a = _events(a)
    b.connect(a.address)
    wait_until(lambda: log_a == [("up", b.id)])
    b.stop()
    wait_until(lambda: len(log_a) == 2)
    assert log_a[1] == ("down", b.id, DisconnectReason.SHUTDOWN)


def test_no_inbound_slots_refuses_after_handshake(nodes):
    a = nodes.make(max_inbound=0)
    c = nodes.make()
    with pytest.raises(HandshakeError) as info:
        c.connect(a.address)
    assert info.value.reason == DisconnectReason.TOO_MANY_PEERS
    assert not a.peers


def test_full_inbound_slots_evict_for_a_newcomer(nodes):
    a = nodes.make(max_inbound=1)
    b, c = nodes.make(), nodes.make()
    reasons = []
    b.on_event("peer_disconnected")(lambda p, r: reasons.append(r))
    b.connect(a.address)
    c.connect(a.address)
    assert [p.id for p in a.peers] == [c.id]
    wait_until(lambda: reasons == [DisconnectReason.EVICTED])
    assert a.metrics["evicted"] == 1
