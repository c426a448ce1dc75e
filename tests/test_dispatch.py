"""The dispatcher over real loopback sockets: ordering, isolation, events, errors, registry,
back-pressure, and a fixed set of workers."""
import logging
import time

import gevent
import pytest
from gevent.event import Event

from gp2p import Context, DisconnectReason
from gp2p.testing import alive_greenlets, wait_until

pytestmark = pytest.mark.timeout(60)


def _peer_of(node, node_id):
    return next(p for p in node.peers if p.id == node_id)


def _workers(node):
    return alive_greenlets(f"{node.tasks.name}:worker:")


# -- ordering ------------------------------------------------------------------------------


@pytest.mark.parametrize("concurrency", [1, 100])
def test_handlers_of_one_peer_start_in_send_order(nodes, concurrency):
    receiver = nodes.make(handler_concurrency=concurrency)
    senders = [nodes.make() for _ in range(3)]
    started = {s.id: [] for s in senders}
    n = 300

    @receiver.on("seq")
    def seq(peer, payload):
        started[peer.id].append(payload)
        gevent.sleep(0.001 * (payload % 3))  # handlers overlap: only their starts are ordered

    for s in senders:
        s.connect(receiver.address)

    def blast(node):
        for i in range(n):
            node.send(receiver.id, "seq", i)
            if i % 50 == 49:
                gevent.sleep(0)  # let the senders interleave

    gevent.joinall([gevent.spawn(blast, s) for s in senders], timeout=20, raise_error=True)
    wait_until(lambda: all(len(v) == n for v in started.values()), timeout=20)
    for s in senders:
        assert started[s.id] == list(range(n))


def test_slow_handler_for_one_peer_does_not_stall_another(nodes):
    node = nodes.make(heartbeat_interval=0.1, peer_timeout=1.0)
    a = nodes.make(heartbeat_interval=0.1, peer_timeout=1.0)
    b = nodes.make(heartbeat_interval=0.1, peer_timeout=1.0)
    release = Event()
    slow_started, slow_done, fast = [], [], []

    @node.on("slow")
    def slow(peer, payload):
        slow_started.append(payload)
        release.wait()
        slow_done.append(payload)

    node.on("fast")(lambda peer, payload: fast.append(payload))
    a.connect(node.address)
    b.connect(node.address)
    for i in range(3):  # several, so a's inbox stays scheduled while its handlers block
        a.send(node.id, "slow", i)
    wait_until(lambda: slow_started, timeout=5)
    try:
        peer_b = _peer_of(node, b.id)
        # b's messages are read and handled, in order
        for i in range(200):
            b.send(node.id, "fast", i)
        wait_until(lambda: len(fast) == 200, timeout=10)
        assert fast == list(range(200))
        # b's heartbeats go on: fresh frames and fresh RTT samples, twice over
        for _ in range(2):
            samples, seen = list(peer_b._rtts), peer_b.last_seen
            wait_until(lambda: list(peer_b._rtts) != samples and peer_b.last_seen > seen, timeout=5)
        assert 0 < peer_b.ping(timeout=2.0) < 2.0
        assert not slow_done  # a's handler is still blocked all along
    finally:
        release.set()
    wait_until(lambda: sorted(slow_done) == [0, 1, 2], timeout=5)
    assert slow_started == [0, 1, 2]


# -- events --------------------------------------------------------------------------------


@pytest.mark.parametrize("concurrency", [1, 100])
def test_peer_events_come_before_and_after_that_peers_messages(nodes, concurrency):
    receiver = nodes.make(handler_concurrency=concurrency)
    senders = [nodes.make() for _ in range(3)]
    log = []
    receiver.on_event("peer_connected")(lambda peer: log.append(("up", peer.id)))
    receiver.on_event("peer_disconnected")(lambda peer, reason: log.append(("down", peer.id, reason)))

    @receiver.on("m")
    def m(peer, payload):
        log.append(("m", peer.id, payload))
        gevent.sleep(0)

    n = 100

    def talk(node):
        node.connect(receiver.address)
        for i in range(n):
            node.send(receiver.id, "m", i)
        node.stop()  # the disconnect goes out after every queued message

    gevent.joinall([gevent.spawn(talk, s) for s in senders], timeout=20, raise_error=True)
    wait_until(lambda: sum(1 for e in log if e[0] == "down") == len(senders), timeout=10)
    for s in senders:
        mine = [e for e in log if e[1] == s.id]
        assert mine[0] == ("up", s.id)
        assert mine[1:-1] == [("m", s.id, i) for i in range(n)]
        assert mine[-1] == ("down", s.id, DisconnectReason.SHUTDOWN)


# -- handler errors ------------------------------------------------------------------------


def test_handler_exception_is_logged_and_dispatch_goes_on(nodes, caplog):
    receiver = nodes.make(handler_concurrency=1)
    sender = nodes.make()
    got = []

    def exploding_handler(peer, payload):
        raise RuntimeError(f"kaboom {payload}")

    receiver.on("boom")(exploding_handler)
    receiver.on("ok")(lambda peer, payload: got.append(payload))
    calls = []

    def bad_listener(peer):
        raise ValueError("listener broke")

    receiver.on_event("peer_connected")(bad_listener)
    receiver.on_event("peer_connected")(lambda peer: calls.append(peer.id))
    sender.connect(receiver.address)
    for i in range(3):
        sender.send(receiver.id, "boom", i)
        sender.send(receiver.id, "ok", i)
    wait_until(lambda: got == [0, 1, 2], timeout=5)
    # a failing listener does not stop the next one
    assert calls == [sender.id]
    assert receiver.metrics["handler_errors"] == 4
    failures = [r for r in caplog.records
                if r.exc_info and isinstance(r.exc_info[1], RuntimeError)
                and str(r.exc_info[1]).startswith("kaboom")]
    assert [str(r.exc_info[1]) for r in failures] == ["kaboom 0", "kaboom 1", "kaboom 2"]
    assert all(r.levelno == logging.ERROR and "exploding_handler" in r.getMessage() for r in failures)
    assert "Traceback" in caplog.text and 'raise RuntimeError(f"kaboom {payload}")' in caplog.text
    assert any(r.exc_info and isinstance(r.exc_info[1], ValueError) and "bad_listener" in r.getMessage()
               for r in caplog.records)
    assert sender.peers and receiver.peers  # the connection is untouched


# -- the registry --------------------------------------------------------------------------


def test_on_registers_once_refuses_reserved_kinds_and_returns_the_function(nodes):
    node = nodes.make(start=False)  # handlers may be registered before start

    def first_chat_handler(peer, payload):
        pass

    def second_chat_handler(peer, payload):
        pass

    assert node.on("chat")(first_chat_handler) is first_chat_handler
    with pytest.raises(ValueError) as info:
        node.on("chat")(second_chat_handler)
    assert first_chat_handler.__qualname__ in str(info.value)
    assert "'chat'" in str(info.value)
    with pytest.raises(ValueError, match="reserved"):
        node.on("gp2p.ping")
    with pytest.raises(ValueError):
        node.on("")
    with pytest.raises(ValueError, match="unknown event"):
        node.on_event("peer_exploded")

    def listener(peer):
        pass

    assert node.on_event("peer_connected")(listener) is listener
    assert node.on_event("peer_connected")(listener) is listener  # listeners may repeat


def test_context_handler_gets_how_the_message_came(nodes):
    receiver, sender = nodes.make(), nodes.make()
    got = []

    @receiver.on("ctx", context=True)
    def with_context(peer, payload, ctx):
        got.append((peer.id, payload, ctx))

    assert with_context.__name__ == "with_context"
    sender.connect(receiver.address)
    sender.send(receiver.id, "ctx", {"a": [1, b"\x00"]})
    wait_until(lambda: got, timeout=5)
    peer_id, payload, ctx = got[0]
    assert peer_id == sender.id and payload == {"a": [1, b"\x00"]}
    assert isinstance(ctx, Context)
    assert ctx.via == "send" and ctx.origin == sender.id
    assert ctx.msg_id is None and ctx.hops == 0


def test_unhandled_kind_is_dropped_and_counted(nodes):
    receiver, sender = nodes.make(), nodes.make()
    got = []
    receiver.on("marker")(lambda peer, payload: got.append(payload))
    sender.connect(receiver.address)
    for i in range(3):
        sender.send(receiver.id, "nobody-handles-this", i)
    sender.send(receiver.id, "marker", "after")
    wait_until(lambda: got, timeout=5)
    assert got == ["after"]  # nothing else ran, and the marker came after the three
    assert receiver.metrics["unhandled"] == 3
    assert receiver.metrics["delivered"] == 1
    assert sender.peers and receiver.peers


# -- back-pressure -------------------------------------------------------------------------


def test_full_inbox_pauses_the_reader_pushes_back_and_suspends_liveness(nodes):
    timeout = 0.5
    receiver = nodes.make(inbox_size=5, handler_concurrency=1, heartbeat_interval=0.1,
                          peer_timeout=timeout)
    # the sender's out-queue has room for everything: only TCP can hold its bytes back
    sender = nodes.make(heartbeat_interval=0.1, peer_timeout=timeout, send_timeout=10.0,
                        out_queue_bytes=64 * 1024 * 1024)
    downs = []
    for node in (receiver, sender):
        node.on_event("peer_disconnected")(lambda peer, reason: downs.append((peer.id, reason)))
    release = Event()
    got = []

    @receiver.on("m")
    def m(peer, payload):
        got.append(payload[0])
        release.wait()

    out = sender.connect(receiver.address)
    into = _peer_of(receiver, sender.id)
    count, blob = 1024, b"x" * (16 * 1024)  # 16 MiB: more than loopback's socket buffers
    for i in range(count):
        sender.send(out, "m", [i, blob])
    try:
        # one handler running, five waiting, and the reader stopped on the next one
        wait_until(lambda: into.inbox is not None and len(into.inbox.items) == 5
                   and receiver.metrics["inbox_full"] >= 1, timeout=5)
        paused_at = time.monotonic()
        # stay paused well past peer_timeout: the receiver hears nothing from the sender
        # (its pongs wait behind the blocked messages), yet does not time it out
        wait_until(lambda: time.monotonic() - into.last_seen > 3 * timeout
                   and time.monotonic() - paused_at > 3 * timeout, timeout=10)
        assert got == [0] and len(into.inbox.items) == 5
        assert not into.closed and not out.closed and not downs
        # TCP pushed back: the sender still holds bytes its writer could not hand to the kernel
        assert out.queued_bytes > 1024 * 1024
    finally:
        release.set()
    wait_until(lambda: len(got) == count, timeout=30)
    assert got == list(range(count))
    wait_until(lambda: out.queued_bytes == 0, timeout=5)
    assert not into.closed and not out.closed and not downs
    assert [p.id for p in receiver.peers] == [sender.id]


# -- workers -------------------------------------------------------------------------------


def test_no_greenlet_per_message_workers_stay_within_handler_concurrency(nodes):
    receiver = nodes.make(handler_concurrency=4)
    senders = [nodes.make() for _ in range(3)]
    release = Event()
    running = []

    @receiver.on("job")
    def job(peer, payload):
        running.append(payload)
        release.wait()

    for s in senders:
        s.connect(receiver.address)
    per_sender = 30
    for s in senders:
        for i in range(per_sender):
            s.send(receiver.id, "job", (s.id, i))
    try:
        # every message has been read: 4 handlers blocked, the rest waiting in inboxes
        wait_until(lambda: len(running) == 4 and sum(len(p.inbox.items) for p in receiver.peers)
                   == len(senders) * per_sender - 4, timeout=10)
        assert len(_workers(receiver)) == 4
    finally:
        release.set()
    wait_until(lambda: len(running) == len(senders) * per_sender, timeout=10)
    assert len(_workers(receiver)) <= 4


def test_worker_count_is_bounded_under_a_flood_of_quick_messages(nodes):
    receiver = nodes.make()  # handler_concurrency defaults to 100
    senders = [nodes.make() for _ in range(2)]
    peaks = []
    got = []

    @receiver.on("quick")
    def quick(peer, payload):
        got.append(payload)
        if payload % 250 == 0:
            peaks.append(len(_workers(receiver)))
        gevent.sleep(0)

    for s in senders:
        s.connect(receiver.address)
    for s in senders:
        for i in range(1000):
            s.send(receiver.id, "quick", i)
    wait_until(lambda: len(got) == 2000, timeout=20)
    assert max(peaks) <= receiver.config.handler_concurrency
    assert len(_workers(receiver)) <= receiver.config.handler_concurrency
