"""Request / response over real loopback sockets: answers, remote errors, timeouts, peers
that go away, many requests at once, the per-peer cap, late answers and the handler API."""
import time
from collections import Counter

import gevent
import pytest
from gevent.event import Event

from gp2p import Context, EncodeError, FrameTooLarge, PeerGone, RemoteError, RequestTimeout
from gp2p.testing import wait_until

pytestmark = pytest.mark.timeout(60)


def _peer_of(node, node_id):
    return next(p for p in node.peers if p.id == node_id)


def _make(nodes, **config):
    """A node that dials only whom the test tells it to (no redial after a disconnect)."""
    return nodes.make(target_outbound=0, **config)


def _pair(nodes, client_config=None, **server_config):
    """A server with the given config, and a client connected to it."""
    server = _make(nodes, **server_config)
    client = _make(nodes, **(client_config or {}))
    client.connect(server.address)
    return server, client


# -- answers and errors --------------------------------------------------------------------


def test_request_returns_the_handlers_value(nodes):
    server, client = _pair(nodes)
    seen = []

    @server.on("double")
    def double(peer, payload):
        seen.append(peer.id)
        return {"twice": payload * 2, "raw": b"\x00\x01", "none": None, "list": [1.5, True]}

    answer = {"twice": 42, "raw": b"\x00\x01", "none": None, "list": [1.5, True]}
    assert client.request(server.id, "double", 21) == answer
    out = _peer_of(client, server.id)
    assert client.request(out, "double", 21, timeout=2.0) == answer  # a Peer works too
    server.on("nothing")(lambda peer, payload: None)
    assert client.request(server.id, "nothing") is None
    assert seen == [client.id, client.id]
    assert client._rpc.pending == 0


def test_remote_exception_comes_back_as_remote_error_without_traceback(nodes):
    server, client = _pair(nodes)

    class LedgerError(Exception):
        pass

    @server.on("fail")
    def fail(peer, payload):
        if payload == "custom":
            raise LedgerError("block 7 does not extend the chain")
        return {}[payload]

    with pytest.raises(RemoteError) as info:
        client.request(server.id, "fail", "missing-key")
    assert info.value.type == "KeyError"
    assert info.value.message == "'missing-key'"
    with pytest.raises(RemoteError) as info:
        client.request(server.id, "fail", "custom")
    assert info.value.type == "LedgerError"
    assert info.value.message == "block 7 does not extend the chain"
    text = f"{info.value} {info.value.message}"
    assert "Traceback" not in text and "test_rpc.py" not in text and "line " not in text
    assert server.metrics["handler_errors"] == 2
    assert client.peers and server.peers  # an error answer does not cost the connection


def test_an_error_message_that_cannot_be_encoded_still_comes_back(nodes):
    server, client = _pair(nodes)

    @server.on("open")
    def open_file(peer, payload):
        name = b"caf\xe9".decode("utf-8", "surrogateescape")  # as os.listdir() may give
        raise FileNotFoundError(f"no file {name}")

    with pytest.raises(RemoteError) as info:
        client.request(server.id, "open", None, timeout=5.0)
    assert info.value.type == "FileNotFoundError"
    assert info.value.message.startswith("no file caf")
    assert client.metrics["rpc.timeouts"] == 0


def test_unhandled_kind_raises_remote_error_no_handler(nodes):
    server, client = _pair(nodes)
    with pytest.raises(RemoteError) as info:
        client.request(server.id, "nobody-serves-this", 1)
    assert info.value.type == "NoHandler"
    assert "nobody-serves-this" in info.value.message
    assert server.metrics["unhandled"] == 1


@pytest.mark.parametrize("codec", ["msgpack", "json"])
@pytest.mark.parametrize("answer", [object, lambda: {1: "int key"}, lambda: b"x" * 4096],
                         ids=["object", "int-key", "too-large"])
def test_an_answer_that_cannot_be_encoded_raises_encode_error(nodes, codec, answer):
    server, client = _pair(nodes, codec=codec, max_frame_size=1024, out_queue_bytes=64 * 1024)
    server.on("bad")(lambda peer, payload: answer())
    server.on("echo")(lambda peer, payload: payload)
    with pytest.raises(RemoteError) as info:
        client.request(server.id, "bad", None)
    assert info.value.type == "EncodeError"
    assert client.request(server.id, "echo", "still fine") == "still fine"


def test_a_request_that_cannot_be_sent_raises_before_anything_goes_out(nodes):
    server, client = _pair(nodes, client_config={"max_frame_size": 64 * 1024})
    got = []
    server.on("echo")(lambda peer, payload: got.append(payload) or payload)
    for payload in (object(), {1: "int key"}):
        with pytest.raises(EncodeError):
            client.request(server.id, "echo", payload)
    with pytest.raises(FrameTooLarge):
        client.request(server.id, "echo", b"x" * (client.config.max_frame_size + 1))
    assert client._rpc.pending == 0
    assert client.request(server.id, "echo", "marker") == "marker"
    assert got == ["marker"]


def test_a_request_the_validator_refuses_raises_rejected(nodes):
    server, client = _pair(nodes)
    ran = []

    def positive(peer, payload):
        if payload == "explode":
            raise TypeError("validator broke")
        return payload > 0

    @server.on("sqrt", validate=positive)
    def sqrt(peer, payload):
        ran.append(payload)
        return payload ** 0.5

    assert client.request(server.id, "sqrt", 16) == 4.0
    for bad in (-1, "explode"):
        with pytest.raises(RemoteError) as info:
            client.request(server.id, "sqrt", bad)
        assert info.value.type == "Rejected"
    assert ran == [16]
    assert server.metrics["rejected"] == 2
    assert _peer_of(server, client.id).misbehaviour == 2


def test_context_handler_sees_a_request(nodes):
    server, client = _pair(nodes)
    got = []

    @server.on("who", context=True)
    def who(peer, payload, ctx):
        got.append((peer.id, ctx))
        return ctx.via

    assert client.request(server.id, "who", None) == "request"
    peer_id, ctx = got[0]
    assert isinstance(ctx, Context)
    assert peer_id == client.id and ctx.origin == client.id
    assert ctx.msg_id is None and ctx.hops == 0


# -- timeouts, late answers and peers that go away ----------------------------------------------


def test_no_answer_in_time_raises_request_timeout(nodes):
    server, client = _pair(nodes)
    release = Event()
    started = []

    @server.on("slow")
    def slow(peer, payload):
        started.append(payload)
        release.wait(10)
        return payload

    try:
        t0 = time.monotonic()
        with pytest.raises(RequestTimeout):
            client.request(server.id, "slow", 1, timeout=0.3)
        elapsed = time.monotonic() - t0
        assert 0.25 <= elapsed < 2.0  # the hub's clock may fire a timer a hair early
        assert started == [1]
        assert client.metrics["rpc.timeouts"] == 1
        assert client._rpc.pending == 0
        assert client.peers and server.peers  # a timeout does not cost the connection
    finally:
        release.set()


def test_a_late_answer_is_dropped_and_counted(nodes):
    server, client = _pair(nodes)
    release = Event()

    @server.on("slow")
    def slow(peer, payload):
        release.wait(10)
        return payload

    server.on("echo")(lambda peer, payload: payload)
    with pytest.raises(RequestTimeout):
        client.request(server.id, "slow", "late", timeout=0.2)
    assert client.metrics["rpc.late"] == 0
    release.set()
    wait_until(lambda: client.metrics["rpc.late"] == 1, timeout=5)
    # the marker: the next request gets its own answer, not the late one
    assert client.request(server.id, "echo", "marker") == "marker"
    assert client.metrics["rpc.late"] == 1
    assert client._rpc.pending == 0


@pytest.mark.parametrize("how", ["stop", "reset"])
def test_a_peer_that_goes_away_fails_its_requests_at_once(nodes, how):
    server, client = _pair(nodes)
    release = Event()
    started = Event()

    @server.on("hang")
    def hang(peer, payload):
        started.set()
        release.wait(10)
        return payload

    timeout = 10.0

    def ask(i):
        try:
            return client.request(server.id, "hang", i, timeout=timeout)
        except PeerGone as exc:
            return exc

    calls = [gevent.spawn(ask, i) for i in range(3)]
    try:
        assert started.wait(5)
        t0 = time.monotonic()
        if how == "stop":
            stopper = gevent.spawn(server.stop)  # waits for the blocked handler: not for us
        else:
            _peer_of(server, client.id).abort()  # a TCP reset, as a crash would
        gevent.joinall(calls, timeout=5)
        elapsed = time.monotonic() - t0
        for call in calls:
            assert call.ready() and isinstance(call.value, PeerGone)
        assert elapsed < 1.0, f"PeerGone took {elapsed:.2f}s (request timeout {timeout}s)"
        assert client.metrics["rpc.timeouts"] == 0
        assert client._rpc.pending == 0
        wait_until(lambda: not client.peers, timeout=5)
        with pytest.raises(PeerGone):
            client.request(server.id, "hang", 9)  # not connected: at once
    finally:
        release.set()
    if how == "stop":
        stopper.get(timeout=10)


# -- many at once -----------------------------------------------------------------------------


def test_1000_concurrent_requests_to_one_peer_are_all_answered(nodes):
    server, client = _pair(nodes)
    running = [0]
    peak = [0]

    @server.on("square")
    def square(peer, payload):
        running[0] += 1
        peak[0] = max(peak[0], running[0])
        try:
            gevent.sleep(0)  # let other requests start meanwhile
            return payload * payload
        finally:
            running[0] -= 1

    n = 1000
    calls = [gevent.spawn(client.request, server.id, "square", i, timeout=30) for i in range(n)]
    gevent.joinall(calls, timeout=40, raise_error=True)
    assert [call.value for call in calls] == [i * i for i in range(n)]
    assert peak[0] > 1  # they did run side by side
    assert peak[0] <= server.config.handler_concurrency
    assert client._rpc.pending == 0
    assert client.metrics["rpc.timeouts"] == 0 and client.metrics["rpc.late"] == 0


def test_max_requests_per_peer_caps_running_requests_and_refuses_none(nodes):
    server = _make(nodes, max_requests_per_peer=5)
    clients = [_make(nodes) for _ in range(2)]
    for client in clients:
        client.connect(server.address)
    release = Event()
    running, peak = Counter(), Counter()

    @server.on("work")
    def work(peer, payload):
        running[peer.id] += 1
        peak[peer.id] = max(peak[peer.id], running[peer.id])
        try:
            release.wait(20)
            return payload
        finally:
            running[peer.id] -= 1

    n = 40
    calls = {c.id: [gevent.spawn(c.request, server.id, "work", i, timeout=30) for i in range(n)]
             for c in clients}
    try:
        # five of each client's requests run; the other 35 wait in its inbox
        wait_until(lambda: all(running[c.id] == 5 for c in clients)
                   and all(len(p.inbox.items) == n - 5 for p in server.peers), timeout=10)
        assert sum(running.values()) == 10  # one peer's cap does not hold up another's
    finally:
        release.set()
    for client in clients:
        gevent.joinall(calls[client.id], timeout=20, raise_error=True)
        assert [call.value for call in calls[client.id]] == list(range(n))
    assert peak == Counter({c.id: 5 for c in clients})
    assert server.metrics["handler_errors"] == 0
