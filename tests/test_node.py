"""Node API and lifecycle: start, stop, seeds, persistent peers, leaks."""
import os

import gevent
import msgpack
import pytest

import gp2p
from gp2p import DisconnectReason, PeerGone
from gp2p.testing import (RawPeer, alive_greenlets, assert_stopped_clean, disconnect_reason, fd_count, next_host,
                          wait_until)
from gp2p.wire import frame


def test_stop_leaves_no_greenlet_or_socket(nodes):
    before = fd_count()
    hub = [nodes.make() for _ in range(1)][0]
    others = [nodes.make(bootstrap=[hub.address]) for _ in range(4)]
    assert hub.wait_for_peers(4, timeout=5)
    for node in others:
        assert node.wait_for_peers(1, timeout=5)
        node.send(hub.id, "nobody-handles-this", b"x")
    for node in [hub] + others:
        node.stop()
        node.stop()  # idempotent
        assert_stopped_clean(node)
    wait_until(lambda: fd_count() <= before, timeout=5)
    names = [g.name for g in alive_greenlets() if g.name.startswith(("node:", "listener:"))]
    assert not names


def test_seeds_connect_and_peers_have_directions(nodes):
    seed = nodes.make()
    a = nodes.make(bootstrap=[seed.address])
    assert a.wait_for_peers(1, timeout=5) and seed.wait_for_peers(1, timeout=5)
    assert a.peers[0].direction == "outbound" and seed.peers[0].direction == "inbound"
    assert not seed.wait_for_peers(2, timeout=0.05)


@pytest.mark.parametrize("field", ["bootstrap", "persistent_peers"])
def test_a_peer_that_restarts_is_dialled_again(nodes, field):
    # a seed is redialled while the node has no peer; a persistent peer always is
    host = next_host()
    first = nodes.make(listen=f"{host}:0")
    port = first.address.split(":")[1]
    a = nodes.make(**{field: [first.address]})
    assert a.wait_for_peers(1, timeout=5)
    first.stop()
    wait_until(lambda: not a.peers)
    again = nodes.make(listen=f"{host}:{port}")
    wait_until(lambda: [p.id for p in a.peers] == [again.id], timeout=10)


def test_listen_range_and_list_take_the_first_free_port(nodes):
    host = next_host()
    first = nodes.make(listen=f"{host}:0")
    port = int(first.address.split(":")[1])
    second = nodes.make(listen=f"{host}:{port}-{port + 50}")
    assert int(second.address.split(":")[1]) > port
    third = nodes.make(listen=f"{host}:{port},{second.address.split(':')[1]},0")
    assert third.address not in (first.address, second.address)


def test_client_only_node_dials_out(nodes):
    server = nodes.make()
    client = nodes.make(listen=None, source_address=next_host())
    assert client.address is None
    peer = client.connect(server.address)
    assert peer.direction == "outbound"
    assert server.peers[0].address is None  # it told us it does not listen


def test_send_errors(nodes):
    a, b = nodes.make(), nodes.make()
    with pytest.raises(PeerGone):
        a.send("ab" * 32, "chat", 1)
    peer = a.connect(b.address)
    with pytest.raises(ValueError, match="reserved"):
        a.send(peer, "gp2p.ping", 1)
    with pytest.raises(ValueError):
        a.send(peer, "chat", object())
    b.stop()
    wait_until(lambda: not a.peers)
    with pytest.raises(PeerGone):
        a.send(peer, "chat", 1)


def test_unhandled_kind_is_counted_and_marker_arrives(nodes):
    a, b = nodes.make(), nodes.make()
    got = []
    b.on("marker")(lambda peer, payload: got.append(payload))
    a.connect(b.address)
    a.send(b.id, "nobody", 1)
    a.send(b.id, "marker", 2)
    wait_until(lambda: got == [2])
    assert b.metrics["unhandled"] == 1


def test_context_manager_and_lifecycle_errors():
    with gp2p.Node(listen=f"{next_host()}:0") as node:
        assert node.started and not node.closed and node.address
        with pytest.raises(RuntimeError):
            node.start()
    assert node.closed
    assert_stopped_clean(node)
    with pytest.raises(RuntimeError):
        node.connect("127.0.0.1:1")


def test_failed_start_closes_what_it_opened():
    taken = gp2p.Node(listen=f"{next_host()}:0").start()
    try:
        node = gp2p.Node(listen=taken.address)
        with pytest.raises(OSError):
            node.start()
        assert node.closed
        assert_stopped_clean(node)
    finally:
        taken.stop()


def test_identity_persists_in_datadir(tmp_path, nodes):
    datadir = str(tmp_path / "data")
    a = nodes.make(datadir=datadir)
    first = a.id
    a.stop()
    assert oct(os.stat(datadir).st_mode & 0o777) == "0o700"
    assert nodes.make(datadir=datadir).id == first


def test_crash_in_owned_greenlet_stops_node_and_serve_forever_reraises(nodes, hub_errors):
    node = nodes.make()

    def boom():
        raise RuntimeError("bug")

    node.tasks.spawn("buggy", boom)
    with pytest.raises(RuntimeError, match="bug"):
        with gevent.Timeout(5):
            node.serve_forever()
    assert node.closed
    hub_errors.errors.clear()  # this test made a greenlet die on purpose


def test_shutdown_reason_reaches_the_remote(nodes):
    a, b = nodes.make(), nodes.make()
    reasons = []
    a.on_event("peer_disconnected")(lambda p, r: reasons.append(r))
    b.connect(a.address)
    b.stop()
    wait_until(lambda: reasons == [DisconnectReason.SHUTDOWN])


def test_bad_outgoing_messages_are_refused_before_sending(nodes):
    a, b = nodes.make(), nodes.make()
    got = []
    b.on("ok")(lambda peer, payload: got.append(payload))
    peer = a.connect(b.address)
    for kind, payload in [("x" * 257, 1), ("ok", {1: "int key"}), ("ok", [{"a": {(1, 2): 3}}]),
                          ("ok", object())]:
        with pytest.raises(gp2p.EncodeError):
            a.send(peer, kind, payload)
    with pytest.raises(gp2p.FrameTooLarge):
        a.send(peer, "ok", b"x" * (a.config.max_frame_size + 1))
    a.send(peer, "ok", {"nested": [{"deep": b"bytes"}]})  # the connection survived all that
    wait_until(lambda: got == [{"nested": [{"deep": b"bytes"}]}])


def test_a_claimed_listen_address_does_not_stop_us_dialling_it(nodes):
    target = nodes.make()
    liar = nodes.make(advertise=target.address)  # claims to be target
    a = nodes.make()
    assert a.connect(liar._listener.address).id == liar.id
    assert a.connect(target.address).id == target.id


def test_kill_resets_every_connection_and_leaves_nothing(nodes, tmp_path):
    # kill() is a crash: peers see the connection lost (no SHUTDOWN), nothing is saved,
    # and no greenlet or socket of the killed node is left
    victim = nodes.make(datadir=str(tmp_path / "victim"))
    others = [nodes.make(bootstrap=[victim.address]) for _ in range(3)]
    assert victim.wait_for_peers(3, timeout=5)
    assert all(node.wait_for_peers(1, timeout=5) for node in others)
    reasons = []
    for node in others:
        node.on_event("peer_disconnected")(lambda peer, reason: reasons.append(reason))
    victim.kill()
    victim.kill()  # idempotent
    assert_stopped_clean(victim)
    wait_until(lambda: len(reasons) == 3, timeout=5)
    assert set(reasons) == {DisconnectReason.CONNECTION_LOST}
    assert not os.path.exists(victim._datadir.book_path)  # stop() would have written it



def test_a_peer_closed_while_it_is_still_sending_gets_the_reason_not_a_reset(nodes):
    # closing a socket with unread bytes sends a reset, which destroys the disconnect frame
    # (and an evicted peer's farewell addresses) and fails the other end's writes; the node
    # must half-close and drain until the other end closes instead
    node = nodes.make()
    raw = RawPeer.dial(node.address).handshake()
    wait_until(lambda: node.peers)
    frames = b"".join(frame(msgpack.packb({"type": "msg", "kind": "sink", "payload": b"x" * 10_000}),
                            1 << 20) for _ in range(3000))
    sender = gevent.spawn(raw.send_bytes, frames)  # 30 MB: more than socket buffers hold
    wait_until(lambda: node.metrics["unhandled"] >= 1)
    node.peers[0].close(DisconnectReason.BANNED, "test")
    sender.join(timeout=10)
    assert sender.successful(), sender.exception  # a reset would fail the send
    msg, _ = raw.recv_until(lambda m: m.get("type") == "disconnect")
    assert disconnect_reason(msg) == DisconnectReason.BANNED
    assert raw.wait_closed() == b""
    raw.close()
