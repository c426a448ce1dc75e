"""Peer: one ready connection, with its reader and writer greenlets and its heartbeat.

- The reader decodes and validates frames, answers pings at once, matches pongs, and hands
  everything else to ``route(peer, type, msg)`` (which may block: back-pressure).
- The writer drains an out-queue bounded in bytes, coalescing queued small frames into one
  ``sendall``. A frame is written directly instead, without waiting, only when the
  out-queue is empty and no write is in progress (one writer per socket at a time), and not
  again before the hub's next turn: a burst is left to the writer to coalesce. So the
  writer greenlet runs only while frames wait: it starts when one is queued and ends when
  the queue is empty.
- The heartbeat pings every ``heartbeat_interval`` and closes the peer with TIMEOUT once no
  complete valid frame arrived for ``peer_timeout`` (not counting time our own
  back-pressure held the reader). It is a timer of the hub rather than a greenlet (an idle
  connection then holds one greenlet, its reader): it never blocks, and it hands closing
  and its own failures to a greenlet of the peer.
"""
from __future__ import annotations

import bisect
import contextlib
import logging
import random
import struct
import time
from collections import deque
from typing import Any, Callable, Iterator

import gevent
from gevent.event import Event
from gevent.hub import Waiter

from gp2p.errors import DisconnectReason, FrameTooLarge, PeerGone, PeerTimeout, ProtocolError
from gp2p.identity import short_id
from gp2p.messages import validate
from gp2p.tasks import GroupClosed, TaskGroup
from gp2p.wire import nonblocking_send

log = logging.getLogger(__name__)

__all__ = ["Peer", "READY", "CLOSING", "CLOSED"]

READY, CLOSING, CLOSED = "ready", "closing", "closed"
#: the writer joins queued frames into one sendall up to about this many bytes...
COALESCE_BYTES = 256 * 1024
#: ... when each is smaller than this (a larger one goes out on its own, uncopied)
COALESCE_FRAME = 16 * 1024
#: a reader that received this much without waiting yields once
YIELD_BYTES = 1024 * 1024
RTT_SAMPLES = 16
MAX_OUTSTANDING_PINGS = 32

_now = time.monotonic
_header = struct.Struct(">I").pack
#: ``Peer._writer`` while the queue waits for a flush by the hub (no writer greenlet)
_FLUSH = "flush"
#: message types the peer handles itself; every other one is routed
_OWN_TYPES = frozenset(("ping", "pong", "disconnect", "hello", "ack"))


class Peer:
    """A connected, verified remote node.

    :ivar id: the remote node id (hex public key).
    :ivar address: the remote's listen address (``host:port``), or None if it does not listen.
    :ivar direction: ``"inbound"`` or ``"outbound"``.
    :ivar last_seen: ``time.monotonic()`` of the last complete valid frame.
    """

    def __init__(self, *, info: Any, stream: Any, reader: Any, local: Any, config: Any,
                 route: Callable[["Peer", str, dict], None],
                 on_close: Callable[["Peer", DisconnectReason], None],
                 metrics: Any, owner: str, on_error: Callable | None = None):
        self.id: str = info.id
        self.address: str | None = info.listen
        self.direction: str = info.direction
        self.agent: str = info.agent
        self.features: list[str] = info.features
        self.remote_ip: str = info.remote_ip
        self.info = info
        #: the node that dialled this connection (duplicates keep the smaller one's)
        self.dialer_id: str = local.identity.id if info.direction == "outbound" else info.id
        #: messages of this peer its validation hooks rejected
        self.misbehaviour = 0
        #: monotonic time this peer last gave us something new (a message, a request, a
        #: broadcast we had not seen); eviction protects recent ones
        self.last_useful: float | None = None
        #: the remote sent the ``disconnect`` (so its reason is its verdict, not ours)
        self.closed_by_remote = False
        #: the address we dialled to reach it (outbound only)
        self.dialed_address: str | None = None
        self.state = READY
        self.close_reason: DisconnectReason | None = None
        self.connected_at = _now()
        self.last_seen = self.connected_at
        self.inbox: Any = None  # set by the dispatcher
        self._stream = stream
        self._reader = reader
        self._local = local
        self._config = config
        self._route = route
        self._on_close = on_close
        self._metrics = metrics
        self._encode = local.codec.encode
        self._decode = info.codec.decode
        self._max_frame = config.max_frame_size
        #: frames waiting for the writer (None when there are none: an idle peer holds no deque)
        self._out: deque[bytes] | None = None
        self._out_bytes = 0
        self._out_limit = config.out_queue_bytes
        #: the writer greenlet while one runs (it may be in sendall: nobody else may write)
        self._writer: Any = None
        #: a frame went out directly in this turn of the hub, the next ones are queued: the
        #: loop iteration it went out in, or True until a callback (loops that count none)
        self._corked: Any = None
        self._try_send = nonblocking_send(stream)
        self._loop = gevent.get_hub().loop
        self._room = Event()
        self._room.set()
        self._closed = Event()
        self._paused = 0
        self._resumed_at = self.connected_at
        #: nonce -> (time sent, the Waiter of a ping() call or None for a heartbeat)
        self._pings: dict[int, tuple[float, Waiter | None]] = {}
        self._nonce = random.getrandbits(63)
        self._rtts: list[float] = []
        self._rtts_sorted: list[float] = []
        self._timer: Any = None
        self._next_ping = 0.0
        self._rtt: float | None = None
        self._tasks = TaskGroup(f"{owner}:peer:{short_id(self.id)}", on_error)
        self._greenlets: dict[str, Any] = {}

    def __repr__(self) -> str:
        rtt = self.rtt
        rtt_text = f" rtt={rtt * 1000:.1f}ms" if rtt is not None else ""
        return (f"<Peer {short_id(self.id)}.. {self.address or self.remote_ip} {self.direction} "
                f"{self.state}{rtt_text}>")

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, first_frames: bytes = b"") -> None:
        """Start the greenlets; ``first_frames`` go out before anything else."""
        if first_frames:  # queued, not written now: the caller registers the peer first
            self._out = deque((first_frames,))
            self._out_bytes += len(first_frames)
            self._kick()
        self._greenlets["reader"] = self._tasks.spawn("reader", self._read_loop)
        self._next_ping = _now() + self._config.heartbeat_interval
        self._set_timer(self._config.heartbeat_interval)

    @property
    def closed(self) -> bool:
        return self.state != READY

    def close(self, reason: DisconnectReason = DisconnectReason.SHUTDOWN, text: str = "",
              send: bool = True) -> None:
        """Close with ``reason``; idempotent and non-blocking.

        With ``send`` a ``disconnect`` frame goes out after what is already queued, and the
        writer gets ``close_linger`` seconds to flush before the socket is closed.
        """
        if self.state != READY:
            return
        self.state = CLOSING
        self.close_reason = reason
        level = logging.DEBUG if reason in (DisconnectReason.SHUTDOWN, DisconnectReason.DUPLICATE) else logging.INFO
        log.log(level, "closing %r: %s%s", self, reason.name, f" ({text})" if text else "")
        if send and reason != DisconnectReason.CONNECTION_LOST:
            self._append(self._frame({"type": "disconnect", "reason": int(reason), "text": text[:200]}))
        self._stop_timer()
        self._room.set()
        for _, waiter in self._pings.values():
            if waiter is not None:
                self._loop.run_callback(waiter.switch, PeerGone(f"{self!r} closed: {reason.name}"))
        current = gevent.getcurrent()
        greenlet = self._greenlets.get("reader")
        if greenlet is not None and greenlet is not current:
            greenlet.kill(block=False)
        try:
            self._tasks.spawn("closer", self._finish)
        except GroupClosed:
            self._stream.close()
        self._on_close(self, reason)

    def _finish(self) -> None:
        deadline = time.monotonic() + self._config.close_linger
        writer = self._greenlets.get("writer")
        if writer is not None:
            writer.join(self._config.close_linger)  # returns None, whether or not it ended
        if writer is not None and not writer.dead:
            writer.kill(block=True)
        elif self.close_reason != DisconnectReason.CONNECTION_LOST:
            self._linger(deadline)
        self._stream.close()
        self.state = CLOSED
        self._closed.set()

    def _linger(self, deadline: float) -> None:
        """Half-close, then read and drop until the other end closes too (or ``deadline``).

        Closing a socket with unread bytes in its receive buffer sends a reset, and a reset
        makes the other end drop what it has not read yet: our ``disconnect`` frame and
        whatever preceded it (an evicted peer's farewell addresses). So the socket is only
        closed once the other end has read everything and closed its side."""
        shutdown = getattr(self._stream, "shutdown", None)
        if shutdown is None:
            return
        try:
            shutdown()
            with gevent.Timeout(max(0.0, deadline - time.monotonic()), False):
                scratch = bytearray(65536)
                while self._stream.recv_into(scratch):
                    pass
        except OSError:
            pass

    @property
    def congested(self) -> bool:
        """True when the out-queue is over half full: optional traffic (address relays)
        should wait or be dropped rather than push the peer toward SLOW_PEER."""
        return self._out_bytes * 2 > self._out_limit

    @property
    def socket_closed(self) -> bool:
        """True once the socket is closed (after ``closed``, which is true from close())."""
        return self._closed.is_set()

    def when_socket_closed(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` (from the hub) once the socket is closed."""
        self._closed.rawlink(lambda _event: callback())

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Block until the socket is closed; True if it is."""
        return self._closed.wait(timeout)

    def abort(self) -> None:
        """Drop the connection at once with a TCP reset, as a crash would."""
        self._stream.abort()
        self.close(DisconnectReason.CONNECTION_LOST, send=False)

    def kill(self, timeout: float = 1.0, reset: bool = False, block: bool = True) -> list:
        """Kill whatever of this peer still runs (used by the owner's shutdown); with
        ``reset`` the socket is closed with a TCP reset, as a crash would. Returns the
        greenlets killed (only scheduled to die with ``block=False``)."""
        self._stop_timer()
        victims = self._tasks.kill(timeout=timeout, block=block)
        if reset:
            self._stream.abort()
        self._stream.close()
        self.state = CLOSED
        self._closed.set()
        return victims

    # -- sending -----------------------------------------------------------------------

    def _frame(self, msg: dict) -> bytes:
        body = self._encode(msg)
        size = len(body)
        if size > self._max_frame:
            raise FrameTooLarge(f"message of {size} bytes is above max_frame_size {self._max_frame}")
        return _header(size) + body

    def _append(self, data: bytes) -> None:
        corked = self._corked
        if (not self._out and self._writer is None and self._try_send is not None
                and (corked is None or (corked is not True and corked != self._loop.iteration))):
            try:
                sent = self._try_send(data)
            except OSError:
                sent = 0  # the writer meets the error too, and closes the peer
            if sent == len(data):
                self._cork()
                return
            if sent:
                data = memoryview(data)[sent:]
        if self._out is None:
            self._out = deque()
        _queue(self._out, data)
        self._out_bytes += len(data)
        if self._writer is None:
            self._kick()

    def _kick(self) -> None:
        """Have the queue written: by the hub when the stream can send without waiting,
        else by a writer greenlet."""
        if self._try_send is None:
            self._start_writer()
        else:
            self._writer = _FLUSH
            self._loop.run_callback(self._flush)

    def send_message(self, msg: dict, timeout: float | None = None) -> None:
        """Encode and queue ``msg``, waiting up to ``timeout`` (default ``send_timeout``)
        for room. See :meth:`send_frame`. Encoding errors propagate."""
        data = self._frame(msg)
        # send_frame() written out: this is every application message's way out
        if self.state != READY:
            raise PeerGone(f"{self!r} is not connected")
        out = self._out
        if out:  # frames wait already (a burst): this one goes behind them
            size = len(data)
            if self._out_bytes + size <= self._out_limit:
                last = out[-1]
                if size < COALESCE_FRAME and type(last) is bytearray and len(last) < COALESCE_BYTES:
                    last += data  # _queue() written out
                else:
                    _queue(out, data)
                self._out_bytes += size
                return
            self._wait_for_room(size, self._config.send_timeout if timeout is None else timeout)
        self._append(data)

    def send_frame(self, data: bytes, timeout: float | None = None) -> None:
        """Queue an encoded frame, waiting up to ``timeout`` for room in the out-queue.

        Raises :class:`PeerGone` if the peer is closed, or closes it with SLOW_PEER and
        raises :class:`PeerGone` when no room frees in time.
        """
        if self.state != READY:
            raise PeerGone(f"{self!r} is not connected")
        if self._out_bytes + len(data) > self._out_limit and self._out:
            self._wait_for_room(len(data), self._config.send_timeout if timeout is None else timeout)
        self._append(data)

    def _wait_for_room(self, size: int, timeout: float) -> None:
        deadline = _now() + timeout
        while self._out_bytes + size > self._out_limit and self._out:
            remaining = deadline - _now()
            self._room.clear()
            if remaining <= 0 or not self._room.wait(remaining):
                self.close(DisconnectReason.SLOW_PEER, "out-queue full for send_timeout")
                raise PeerGone(f"{self!r} closed: SLOW_PEER")
            if self.state != READY:
                raise PeerGone(f"{self!r} closed: {self.close_reason.name}")

    def send_nowait(self, msg: dict) -> bool:
        """Queue a message the node makes itself; never waits (see :meth:`send_frame_nowait`)."""
        if self.state != READY:
            return False
        return self.send_frame_nowait(self._frame(msg))

    def send_frame_nowait(self, data: bytes) -> bool:
        """Queue an encoded frame the node makes itself (pongs, relays, responses).

        Never waits: if it does not fit, the peer is closed with SLOW_PEER and False is
        returned.
        """
        if self.state != READY:
            return False
        if self._out_bytes + len(data) > self._out_limit and self._out:
            self.close(DisconnectReason.SLOW_PEER, "out-queue full")
            return False
        self._append(data)
        return True

    def _cork(self) -> None:
        """No direct write again before the hub's next turn (see ``_corked``)."""
        turn = getattr(self._loop, "iteration", None)
        if turn is None:  # a loop without an iteration count: a callback ends the turn
            self._corked = True
            self._loop.run_callback(self._uncork)
        else:
            self._corked = turn

    def _uncork(self) -> None:
        self._corked = None

    @property
    def queued_bytes(self) -> int:
        """Bytes waiting in the out-queue."""
        return self._out_bytes

    def _flush(self) -> None:
        """Write the queue without waiting, from the hub (queued frames cost no greenlet
        when the socket takes them at once); what it does not take goes to a writer."""
        if self._writer is not _FLUSH:
            return
        out = self._out
        try_send = self._try_send
        while out:
            data = out.popleft()
            try:
                sent = try_send(data)
            except OSError:
                sent = 0  # the writer meets the error too, and closes the peer
            self._out_bytes -= sent
            if sent < len(data):
                out.appendleft(memoryview(data)[sent:] if sent else data)
                self._writer = None
                self._start_writer()
                return
            if not self._room.is_set():
                self._room.set()
        self._out = None
        self._writer = None

    def _start_writer(self) -> None:
        try:
            self._writer = self._greenlets["writer"] = self._tasks.spawn("writer", self._write_loop)
        except GroupClosed:
            self._writer = None  # the peer is being killed: nothing more goes out

    def _write_loop(self) -> None:
        """Send until the queue is empty, then end (the next queued frame starts another)."""
        out = self._out
        sendall = self._stream.sendall
        try:
            while out:
                data = out.popleft()
                self._out_bytes -= len(data)
                if not self._room.is_set():
                    self._room.set()
                sendall(data)
            self._out = None
        except OSError as exc:
            self.close(DisconnectReason.CONNECTION_LOST, f"write failed: {exc}", send=False)
        finally:
            self._writer = None

    # -- receiving ---------------------------------------------------------------------

    @contextlib.contextmanager
    def backpressure(self) -> Iterator[None]:
        """Held while our own full inbox keeps the reader waiting: liveness is suspended."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1
            self._resumed_at = _now()

    def _read_loop(self) -> None:
        decode = self._decode
        handle = self._handle
        route = self._route
        reader = self._reader
        read = reader.read_messages
        turn = reader.received + YIELD_BYTES
        try:
            while self.state == READY:
                if reader.received >= turn:
                    # a busy connection yields now and then even when its socket never
                    # blocks: other greenlets get their turn, and its messages get handled
                    # before more pile up (megabytes of them, freed all at once, make
                    # glibc trim the heap and page-fault it back, frame after frame)
                    turn = reader.received + YIELD_BYTES
                    gevent.sleep(0)
                messages = read(decode)
                now = _now()  # they arrived together (a wait for room in route() is not silence)
                for msg in messages:
                    if self.state != READY:
                        break
                    mtype = validate(msg)
                    if mtype in _OWN_TYPES:
                        handle(msg, mtype)
                    else:  # what _handle() would do, written out: most frames go this way
                        self.last_seen = now
                        route(self, mtype, msg)
        except ProtocolError as exc:
            self._metrics.inc("protocol_errors")
            self.close(exc.reason, str(exc))
        except OSError as exc:
            self.close(DisconnectReason.CONNECTION_LOST, str(exc) or type(exc).__name__, send=False)

    def _handle(self, msg: Any, mtype: str) -> None:
        """A validated message of type ``mtype``."""
        if mtype not in _OWN_TYPES:
            self.last_seen = _now()
            self._route(self, mtype, msg)
        elif mtype == "pong":
            entry = self._pings.pop(msg["nonce"], None)
            if entry is None:
                self._metrics.inc("unmatched_pongs")
                return
            now = _now()
            self.last_seen = now
            rtt = now - entry[0]
            self._add_rtt(rtt)
            if entry[1] is not None:  # a ping() call waits: wake it from the hub
                self._loop.run_callback(entry[1].switch, rtt)
        elif mtype == "ping":
            self.last_seen = _now()
            self.send_nowait({"type": "pong", "nonce": msg["nonce"]})
        elif mtype == "disconnect":
            self.last_seen = _now()
            reason = DisconnectReason.from_wire(msg["reason"])
            self.closed_by_remote = True
            self.close(reason, f"by remote: {msg.get('text', '')}".rstrip(": "), send=False)
        else:
            raise ProtocolError(f"{mtype} after the handshake")

    # -- heartbeat and ping ------------------------------------------------------------

    def _new_ping(self, result: Waiter | None) -> int:
        self._nonce = (self._nonce + 1) % (2**64)
        if len(self._pings) >= MAX_OUTSTANDING_PINGS:
            self._pings.pop(next(iter(self._pings)))
        self._pings[self._nonce] = (_now(), result)
        return self._nonce

    def _set_timer(self, delay: float) -> None:
        self._timer = self._loop.timer(max(0.0, delay))
        self._timer.start(self._heartbeat)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.close()
            self._timer = None

    def _heartbeat(self) -> None:
        """The heartbeat timer fired (in the hub: nothing here may block)."""
        self._timer.close()
        self._timer = None
        if self.state != READY:
            return
        try:
            self._beat()
        except Exception as exc:  # escalated as any failing greenlet of the peer is
            with contextlib.suppress(GroupClosed):
                self._tasks.spawn("heartbeat", _reraise, exc)

    def _beat(self) -> None:
        now = _now()
        timeout = self._config.peer_timeout
        if self._paused:
            deadline = now + timeout
        else:
            deadline = max(self.last_seen, self._resumed_at) + timeout
            if now >= deadline:
                self._close_soon(DisconnectReason.TIMEOUT, f"silent for {now - self.last_seen:.2f}s")
                return
        if now >= self._next_ping:
            data = self._frame({"type": "ping", "nonce": self._new_ping(None)})
            if self._out_bytes + len(data) > self._out_limit and self._out:
                self._close_soon(DisconnectReason.SLOW_PEER, "out-queue full")
                return
            self._append(data)
            self._next_ping = now + self._config.heartbeat_interval
        self._set_timer(min(self._next_ping, deadline) - now)

    def _close_soon(self, reason: DisconnectReason, text: str) -> None:
        """Close from a greenlet: closing calls the owner's callbacks, which may block."""
        with contextlib.suppress(GroupClosed):
            self._tasks.spawn("heartbeat", self.close, reason, text)

    def ping(self, timeout: float = 5.0) -> float:
        """Send a ping and return the round-trip time in seconds.

        Raises :class:`PeerTimeout` if no pong comes within ``timeout``, or
        :class:`PeerGone` if the peer closes meanwhile.
        """
        waiter = Waiter()
        nonce = self._new_ping(waiter)
        timer = None
        try:
            self.send_message({"type": "ping", "nonce": nonce}, timeout=timeout)
            timer = self._loop.timer(timeout)
            timer.start(waiter.switch, None)
            rtt = waiter.get()  # the RTT, PeerGone, or None from the timer
        finally:
            self._pings.pop(nonce, None)
            if timer is not None:
                timer.close()
        if rtt is None:
            raise PeerTimeout(f"no pong from {self!r} within {timeout}s")
        if isinstance(rtt, PeerGone):
            raise rtt
        return rtt

    def _add_rtt(self, rtt: float) -> None:
        """Keep the last ``RTT_SAMPLES`` samples, and a sorted copy for the median."""
        ordered = self._rtts_sorted
        if len(self._rtts) == RTT_SAMPLES:
            del ordered[bisect.bisect_left(ordered, self._rtts.pop(0))]
        self._rtts.append(rtt)
        bisect.insort(ordered, rtt)
        half = len(ordered) // 2
        self._rtt = ordered[half] if len(ordered) % 2 else (ordered[half - 1] + ordered[half]) / 2

    @property
    def rtt(self) -> float | None:
        """Median of the recent round-trip times in seconds; None before the first sample."""
        return self._rtt


def _reraise(exc: BaseException) -> None:
    raise exc


def _queue(out: deque, data: bytes) -> None:
    """Put a frame in the out-queue: small frames in a row are joined as they come (into a
    bytearray at the end of the queue), so the writer sends them with one call, uncopied."""
    if len(data) < COALESCE_FRAME:
        last = out[-1] if out else None
        if type(last) is bytearray and len(last) < COALESCE_BYTES:
            last += data
        else:
            out.append(bytearray(data))
    else:
        out.append(data)
