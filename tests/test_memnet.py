"""What only the in-memory network does: latency, partitions, random resets, stats.

What it shares with TCP is in test_transport.py, which runs against both.
"""
import errno
import itertools
import time

import pytest
from gevent.event import Event

from gp2p import DisconnectReason, PeerGone
from gp2p.memnet import RECV_BUFFER, MemoryNetwork
from gp2p.testing import wait_until

from streamkit import StreamEnv, echo, read, read_exactly
from streamkit import accepted as keeping

pytestmark = pytest.mark.timeout(60)

_hosts = (f"10.{n // 65536 % 256}.{n // 256 % 256}.{n % 256}" for n in itertools.count(2 * 65536 + 1))


def host():
    return next(_hosts)


@pytest.fixture
def world():
    """``world(**kwargs)``: a fresh MemoryNetwork(**kwargs) in a harness (``.net``)."""
    worlds = []

    def make(**kwargs):
        w = StreamEnv(MemoryNetwork(**kwargs), host)
        w.net = w.transport
        worlds.append(w)
        return w

    try:
        yield make
    finally:
        for w in worlds:
            w.close()


def test_link_latency_delays_each_direction_and_keeps_order(world):
    w = world()
    a, b, other = host(), host(), host()
    w.net.set_latency(a, b, 0.05)
    listener = w.listen(echo, host=a)
    started = time.monotonic()
    client = w.dial(listener.address, source=b)
    assert time.monotonic() - started >= 0.1  # a dial costs a round trip
    started = time.monotonic()
    client.sendall(b"ping")
    assert read_exactly(client, 4) == b"ping"
    assert time.monotonic() - started >= 0.1
    # lowering the latency never lets a later chunk overtake an earlier one
    client.sendall(b"1")
    w.net.set_latency(a, b, 0.0)
    client.sendall(b"2")
    assert read_exactly(client, 2) == b"12"
    # other links keep the default (no delay): only a lower bound is asserted above
    assert w.dial(listener.address, source=other).remote_ip == a


def test_default_latency_shows_in_node_rtt(world):
    w = world(latency=0.02)
    a, b = w.node(), w.node()
    peer = a.connect(b.address)
    assert peer.ping(timeout=5) >= 0.04
    wait_until(lambda: b.peers)
    assert b.peers[0].ping(timeout=5) >= 0.04


# -- partitions ---------------------------------------------------------------------------

def test_partition_holds_bytes_and_fin_without_reset_and_heal_delivers_them(world):
    w = world()
    a, b, c = host(), host(), host()
    got, accepted = [], []

    def record(stream):
        accepted.append(stream)
        while True:
            data = read(stream)
            got.append((data, healed.is_set()))
            if not data:
                return

    healed = Event()
    listener = w.listen(record, host=a)
    client = w.dial(listener.address, source=b)
    client.sendall(b"before")
    wait_until(lambda: got == [(b"before", False)])
    w.net.partition([a], [b, "10.255.255.255"])
    client.sendall(b"held")  # no error: a partition is silence, not a reset
    client.close()
    with pytest.raises(TimeoutError):
        w.net.dial(listener.address, 0.3, source=b)  # the reader had 0.3 s to see the bytes
    other = w.dial(listener.address, source=c)  # c is on neither side
    wait_until(lambda: len(accepted) == 2)
    assert other.remote_ip == a and got == [(b"before", False)]
    healed.set()
    w.net.heal()
    wait_until(lambda: len(got) == 3)
    assert got == [(b"before", False), (b"held", True), (b"", True)]


def test_abort_across_a_partition_resets_only_after_heal(world):
    w = world()
    a, b = host(), host()
    outcome = []
    healed = Event()

    def wait_for_reset(stream):
        stream.sendall(b"ok")
        try:
            read(stream)
        except ConnectionResetError:
            outcome.append(healed.is_set())

    listener = w.listen(wait_for_reset, host=a)
    client = w.dial(listener.address, source=b)
    assert read_exactly(client, 2) == b"ok"
    w.net.partition([b], [a])
    client.abort()
    with pytest.raises(TimeoutError):
        w.net.dial(listener.address, 0.3, source=b)
    assert outcome == []
    healed.set()
    w.net.heal()
    wait_until(lambda: outcome == [True])


def test_partitioned_peers_time_out_and_reconnect_after_heal(world):
    w = world()
    timers = {"heartbeat_interval": 0.2, "peer_timeout": 0.6}
    a, b = w.node(**timers), w.node(**timers)
    reasons = {a.id: [], b.id: []}
    for node in (a, b):
        node.on_event("peer_disconnected")(lambda peer, reason, me=node.id: reasons[me].append(reason))
    a.connect(b.address)
    wait_until(lambda: b.peers)
    a_ip, b_ip = (n.address.rpartition(":")[0] for n in (a, b))
    started = time.monotonic()
    w.net.partition([a_ip], [b_ip])
    wait_until(lambda: not a.peers and not b.peers, timeout=10)
    assert time.monotonic() - started >= 0.6
    wait_until(lambda: reasons[a.id] and reasons[b.id])
    assert reasons == {a.id: [DisconnectReason.TIMEOUT], b.id: [DisconnectReason.TIMEOUT]}
    with pytest.raises(PeerGone):
        a.connect(b.address, timeout=0.3)
    w.net.heal()
    assert a.connect(b.address).id == b.id


# -- resets -------------------------------------------------------------------------------

def test_reset_probability_one_resets_the_first_send_at_both_ends(world):
    w = world(reset_probability=1.0)
    seen = []

    def handler(stream):
        try:
            read(stream)
        except ConnectionResetError:
            seen.append("reset")

    listener = w.listen(handler)
    client = w.dial(listener.address)
    with pytest.raises(ConnectionResetError):
        client.sendall(b"x")
    wait_until(lambda: seen == ["reset"])
    with pytest.raises(ConnectionResetError):
        client.recv_into(bytearray(1))
    assert w.net.stats()["resets"] == 1
    a, b = w.node(), w.node()
    with pytest.raises(PeerGone):
        a.connect(b.address)  # the handshake's first send
    assert not a.peers and not b.peers


def test_resets_with_a_seed_are_reproducible(world):
    def pattern(net):
        listener = net.listen(f"{host()}:0", lambda stream: Event().wait(), 64)
        outcome = []
        try:
            for _ in range(30):
                stream = net.dial(listener.address, 1.0)
                sends = 0
                try:
                    while sends < 10:
                        stream.sendall(b"x")
                        sends += 1
                except ConnectionResetError:
                    pass
                outcome.append(sends)
                stream.close()
        finally:
            listener.stop(timeout=0)
        return outcome

    first = pattern(world(reset_probability=0.3, seed=7).net)
    assert first == pattern(world(reset_probability=0.3, seed=7).net)
    assert len(set(first)) > 1  # some connections reset early, some late


# -- buffers, addresses, stats ------------------------------------------------------------

def test_a_writer_blocks_once_the_receive_buffer_is_full(world):
    w = world()
    listener, accepted = keeping(w)
    client = w.dial(listener.address)
    wait_until(lambda: accepted)
    sent = []
    writer = w.spawn(lambda: [sent.append(client.sendall(b"x" * 4096)) for _ in range(1000)])
    # sendall yields only when it blocks: the first time we see the writer, it is blocked
    wait_until(lambda: sent)
    assert len(sent) == RECV_BUFFER // 4096 and not writer.dead
    assert read_exactly(accepted[0], 4096) == b"x" * 4096  # one chunk read: one more fits
    wait_until(lambda: len(sent) == RECV_BUFFER // 4096 + 1)


def test_try_send_queues_what_fits_and_never_waits(world):
    w = world()
    listener, accepted = keeping(w)
    client = w.dial(listener.address)
    wait_until(lambda: accepted)
    assert client.try_send(b"a" * (RECV_BUFFER - 10)) == RECV_BUFFER - 10
    assert client.try_send(b"b" * 100) == 10
    assert client.try_send(b"c") == 0
    assert read_exactly(accepted[0], RECV_BUFFER) == b"a" * (RECV_BUFFER - 10) + b"b" * 10
    assert client.try_send(b"c") == 1


def test_a_dial_waits_while_the_pool_is_full_then_times_out(world):
    w = world()
    release = Event()
    listener = w.listen(lambda stream: release.wait(), pool_size=1)
    w.dial(listener.address)
    with pytest.raises(TimeoutError):
        w.net.dial(listener.address, 0.2, host())
    waiting = w.spawn(w.dial, listener.address, None, 5.0)
    release.set()
    assert waiting.get(timeout=5).remote_address == listener.address


def test_dials_without_source_get_distinct_client_ips(world):
    w = world()
    listener, accepted = keeping(w)
    for _ in range(3):
        w.streams.append(w.net.dial(listener.address, 1.0))
    wait_until(lambda: len(accepted) == 3)
    ips = {s.remote_ip for s in accepted}
    assert len(ips) == 3 and all(ip.startswith("172.") for ip in ips)


def test_stats_count_listeners_streams_bytes_and_resets(world):
    w = world()
    assert w.net.stats() == {"listeners": 0, "streams": 0, "bytes_delivered": 0, "resets": 0,
                             "links": 0, "partitions": 0}
    listener = w.listen(echo)
    client = w.dial(listener.address)
    client.sendall(b"0123456789")
    assert read_exactly(client, 10) == b"0123456789"
    assert w.net.stats() == {"listeners": 1, "streams": 2, "bytes_delivered": 20, "resets": 0,
                             "links": 1, "partitions": 0}
    w.net.partition(["10.0.0.1"], ["10.0.0.2"])
    assert w.net.stats()["partitions"] == 1
    w.net.heal()
    client.abort()
    wait_until(lambda: w.net.stats()["streams"] == 0)
    listener.close()
    assert w.net.stats() == {"listeners": 0, "streams": 0, "bytes_delivered": 20, "resets": 1,
                             "links": 0, "partitions": 0}


def test_a_closed_stream_refuses_use_like_a_closed_socket(world):
    w = world()
    listener = w.listen(echo)
    client = w.dial(listener.address)
    client.close()
    for call in (lambda: client.sendall(b"x"), lambda: client.recv_into(bytearray(1))):
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.EBADF


def test_listen_port_in_use_and_bad_arguments(world):
    w = world()
    listener = w.listen(echo)
    with pytest.raises(OSError) as info:
        w.net.listen(listener.address, echo, 1)
    assert info.value.errno == errno.EADDRINUSE
    with pytest.raises(ValueError):
        MemoryNetwork(latency=-1)
    with pytest.raises(ValueError):
        MemoryNetwork(reset_probability=2)
    with pytest.raises(ValueError):
        w.net.set_latency("10.0.0.1", "10.0.0.2", -0.5)
