"""One conformance suite for every transport: TCP (:mod:`gp2p.transport`, loopback 127.x) and
the in-memory network (:class:`gp2p.memnet.MemoryNetwork`, 10.x addresses).

Each test runs once per transport through the ``env`` fixture, first on bare streams, then
with full nodes on top, so that anything above the transport sees the same behaviour.
"""
import hashlib
import itertools
import random

import gevent
import pytest
from gevent.event import Event

from gp2p import DisconnectReason
from gp2p import transport as tcp
from gp2p.memnet import MemoryNetwork
from gp2p.testing import assert_stopped_clean, next_host, wait_until

from streamkit import StreamEnv, accepted, echo, read_exactly, read_to_eof

pytestmark = pytest.mark.timeout(60)

_memory_hosts = (f"10.{n // 65536 % 256}.{n // 256 % 256}.{n % 256}" for n in itertools.count(1 * 65536 + 1))


@pytest.fixture(params=["tcp", "memory"])
def env(request):
    if request.param == "tcp":
        env = StreamEnv(tcp, next_host)
    else:
        env = StreamEnv(MemoryNetwork(), lambda: next(_memory_hosts))
    env.name = request.param
    try:
        yield env
    finally:
        env.close()


# -- streams ------------------------------------------------------------------------------

def test_echo_both_directions(env):
    def greet_then_echo(stream):
        stream.sendall(b"welcome")
        echo(stream)

    listener = env.listen(greet_then_echo)
    client = env.dial(listener.address)
    assert read_exactly(client, 7) == b"welcome"
    for size in (1, 100, 70000):
        payload = random.randbytes(size)
        client.sendall(payload)
        assert read_exactly(client, size) == payload


def test_addresses_name_both_ends_and_remote_ip_is_the_dialling_source(env):
    listener, streams = accepted(env)
    source = env.host()
    client = env.dial(listener.address, source=source)
    wait_until(lambda: streams)
    server = streams[0]
    assert server.remote_ip == source
    assert client.remote_ip == listener.address.rpartition(":")[0]
    assert client.remote_address == listener.address == server.local_address
    assert server.remote_address == client.local_address
    assert client.local_address.startswith(f"{source}:")
    assert server.remote_port == int(client.local_address.rpartition(":")[2]) > 0


def test_ephemeral_ports_are_distinct_and_a_taken_port_is_skipped_or_refused(env):
    host = env.host()
    first, _ = accepted(env, host=host)
    second, _ = accepted(env, host=host)
    port = int(first.address.rpartition(":")[2])
    assert port > 0 and first.address != second.address
    with pytest.raises(OSError):
        accepted(env, host=host, port=port)
    third, _ = accepted(env, host=host, port=f"{port},{port + 1}-{port + 50}")
    assert third.address not in (first.address, second.address)
    assert int(third.address.rpartition(":")[2]) > port


def test_dial_to_a_closed_port_is_refused(env):
    listener, _ = accepted(env)
    listener.stop()
    with pytest.raises(OSError) as info:
        env.dial(listener.address)
    assert isinstance(info.value, ConnectionRefusedError)


def test_close_gives_eof_after_the_buffered_data_and_later_sends_fail(env):
    payload = random.randbytes(300_000)

    def send_and_close(stream):
        stream.sendall(payload)  # the stream is closed (a FIN) when the handler returns

    listener = env.listen(send_and_close)
    client = env.dial(listener.address)
    assert read_to_eof(client) == payload
    assert client.recv_into(bytearray(10)) == 0  # EOF stays EOF
    client.sendall(b"x")  # half-closed (CLOSE_WAIT): accepted; the remote answers with a reset

    def send_fails():
        try:
            client.sendall(b"x")
        except (BrokenPipeError, ConnectionResetError):
            return True
        return False

    wait_until(send_fails, message="sendall to a closed end never failed")
    client.close()
    client.close()  # idempotent
    with pytest.raises(OSError):
        client.sendall(b"x")
    with pytest.raises(OSError):
        client.recv_into(bytearray(10))


def test_abort_resets_the_other_end_blocked_or_not(env):
    outcome = []

    def record_reset(stream):
        stream.sendall(b"ready")
        try:
            stream.recv_into(bytearray(10))  # blocks: the client sends nothing
        except ConnectionResetError:
            outcome.append("reset")
            with pytest.raises((ConnectionResetError, BrokenPipeError)):
                stream.sendall(b"x")
            outcome.append("send failed")

    listener = env.listen(record_reset)
    client = env.dial(listener.address)
    assert read_exactly(client, 5) == b"ready"
    client.abort()
    client.abort()  # idempotent
    client.close()
    wait_until(lambda: outcome == ["reset", "send failed"])


def test_a_reader_blocked_on_a_stream_closed_by_another_greenlet_gets_an_error(env):
    listener, streams = accepted(env)
    client = env.dial(listener.address)
    wait_until(lambda: streams)
    state = {}

    def read():
        state["reading"] = True
        try:
            client.recv_into(bytearray(10))
        except OSError as exc:
            state["error"] = exc

    reader = env.spawn(read)
    wait_until(lambda: state.get("reading"))  # it ran until recv_into blocked
    assert not reader.dead
    client.close()
    reader.join(timeout=5)
    assert isinstance(state.get("error"), OSError)


def test_large_transfer_in_random_chunks_arrives_intact(env):
    rng = random.Random(5)
    payload = rng.randbytes(6 * 1024 * 1024)
    listener = env.listen(echo)
    client = env.dial(listener.address)
    received = hashlib.sha256()
    reader = env.spawn(lambda: received.update(read_exactly(client, len(payload))))
    pos = 0
    while pos < len(payload):  # the echo back flows while we write: no deadlock either way
        size = rng.choice((1, 7, 1000, 4096, 65536, 300_000, 1_000_000))
        client.sendall(memoryview(payload)[pos:pos + size])
        pos += size
    reader.get(timeout=30)
    assert received.hexdigest() == hashlib.sha256(payload).hexdigest()


def test_sendall_blocks_while_the_reader_does_not_read_and_resumes_when_it_does(env):
    size = 32 * 1024 * 1024  # above any socket buffer, kernel ones included
    may_read = Event()
    got = []

    def slow_reader(stream):
        may_read.wait()
        got.append(hashlib.sha256(read_exactly(stream, size)).hexdigest())

    listener = env.listen(slow_reader)
    client = env.dial(listener.address)
    payload = random.randbytes(size)
    state = {}

    def write():
        state["started"] = True
        client.sendall(payload)
        # the marker: what the reader was allowed to do when sendall came back
        state["returned_after_read_allowed"] = may_read.is_set()

    writer = env.spawn(write)
    wait_until(lambda: state.get("started"))  # the writer ran until sendall blocked
    assert not writer.dead
    may_read.set()
    writer.get(timeout=30)
    assert state["returned_after_read_allowed"] is True
    wait_until(lambda: got, timeout=30)
    assert got == [hashlib.sha256(payload).hexdigest()]


def test_pool_size_caps_the_handlers_running_at_once(env):
    active, peak, started = [0], [0], []
    releases = [Event() for _ in range(4)]

    def handler(stream):
        index = len(started)
        started.append(index)
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        releases[index].wait()
        active[0] -= 1

    listener = env.listen(handler, pool_size=2)
    # a dial may wait while the pool is full (memnet), or complete in the backlog (TCP)
    for _ in range(4):
        env.spawn(env.dial, listener.address, None, 10.0)
    wait_until(lambda: len(started) == 2)
    releases[0].set()
    wait_until(lambda: len(started) == 3)
    assert peak[0] == 2
    for release in releases:
        release.set()
    wait_until(lambda: len(started) == 4)
    assert peak[0] == 2


def greet_and_wait(killed):
    """A handler that says hi, then waits for bytes that never come; records being killed."""
    def handler(stream):
        try:
            stream.sendall(b"hi")
            stream.recv_into(bytearray(10))  # the client never sends
        except gevent.GreenletExit:
            killed.append(True)
            raise
    return handler


def test_listener_close_refuses_new_dials_and_stop_kills_running_handlers(env):
    killed = []
    listener = env.listen(greet_and_wait(killed))
    client = env.dial(listener.address)
    assert read_exactly(client, 2) == b"hi"
    listener.close()
    with pytest.raises(ConnectionRefusedError):
        env.dial(listener.address)
    assert not killed  # close leaves accepted connections alone
    listener.stop(timeout=0.1)
    assert killed == [True]
    assert client.recv_into(bytearray(10)) == 0  # the handler's stream was closed


def test_listener_abort_tells_handlers_to_die_without_waiting(env):
    killed = []
    listener = env.listen(greet_and_wait(killed))
    clients = [env.dial(listener.address) for _ in range(3)]
    for client in clients:
        assert read_exactly(client, 2) == b"hi"
    handlers = listener.abort()
    assert len(handlers) == 3 and not killed  # told, not yet dead
    gevent.joinall(handlers, timeout=5)
    assert killed == [True] * 3
    for client in clients:
        assert client.recv_into(bytearray(10)) == 0
    with pytest.raises(ConnectionRefusedError):
        env.dial(listener.address)


# -- nodes on top -------------------------------------------------------------------------

def test_two_nodes_connect_send_and_request(env):
    a, b = env.node(), env.node()
    got = []
    b.on("chat")(lambda peer, payload: got.append((peer.id, payload)))
    b.on("echo")(lambda peer, payload: payload)
    peer = a.connect(b.address)
    assert peer.direction == "outbound" and peer.id == b.id
    assert [p.remote_ip for p in b.peers] == [a.address.rpartition(":")[0]]
    a.send(peer, "chat", {"n": 1, "blob": b"\x00" * 100_000})
    wait_until(lambda: got)
    assert got == [(a.id, {"n": 1, "blob": b"\x00" * 100_000})]
    assert a.request(peer, "echo", [1, "two", b"3"], timeout=5) == [1, "two", b"3"]
    assert peer.ping(timeout=5) >= 0


def test_broadcast_reaches_each_of_three_nodes_once(env):
    a, b, c = env.node(), env.node(), env.node()
    a.connect(b.address)
    b.connect(c.address)
    c.connect(a.address)
    got = {node.id: [] for node in (a, b, c)}
    for node in (a, b, c):
        node.on("news")(lambda peer, payload, me=node.id: got[me].append(payload))
    wait_until(lambda: all(len(n.peers) == 2 for n in (a, b, c)))
    a.broadcast("news", "first")
    b.broadcast("news", "second")
    wait_until(lambda: all(sorted(v) == ["first", "second"] for v in got.values()))
    # a marker after them along every path: no duplicate arrives late
    c.broadcast("news", "marker")
    wait_until(lambda: all("marker" in v for v in got.values()))
    assert all(sorted(v) == ["first", "marker", "second"] for v in got.values())


def test_five_nodes_find_each_other_from_one_seed_and_stop_clean(env):
    fields = {"target_outbound": 2, "heartbeat_interval": 1.0, "peer_timeout": 5.0}
    seed = env.node(**fields)
    others = [env.node(bootstrap=[seed.address], **fields) for _ in range(4)]
    network = [seed] + others
    # each joiner knows only the seed: a second peer means an address travelled by
    # getaddr / addr and was dialled (by it, or by a node that learned its address)
    wait_until(lambda: all(len(n.peers) >= 2 for n in network), timeout=30, interval=0.05,
               message="joiners found no peer besides the seed")
    for node in others:
        assert len(node._pm.book) >= 2, f"{node!r} learned no address besides the seed"
    for node in network:
        for peer in node.peers:  # the address a peer advertises is where its sockets come from
            assert peer.address.rpartition(":")[0] == peer.remote_ip
    for node in network:
        node.stop()
        assert_stopped_clean(node)
    if env.name == "memory":
        wait_until(lambda: env.transport.stats()["streams"] == 0)


def test_a_killed_node_resets_its_connections_and_peers_see_connection_lost(env):
    a, b = env.node(), env.node()
    reasons = []
    a.on_event("peer_disconnected")(lambda peer, reason: reasons.append(reason))
    a.connect(b.address)
    wait_until(lambda: b.peers)
    b.kill()
    wait_until(lambda: reasons, timeout=10)
    assert reasons == [DisconnectReason.CONNECTION_LOST] and not a.peers
