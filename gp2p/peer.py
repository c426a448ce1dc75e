"""Peer: one ready connection, with its reader, writer and heartbeat greenlets.

- The reader decodes and validates frames, answers pings at once, matches pongs, and hands
  everything else to ``route(peer, type, msg)`` (which may block: back-pressure).
- The writer drains an out-queue bounded in bytes, coalescing queued frames into one
  ``sendall``. It is the only greenlet that writes to the socket.
- The heartbeat pings every ``heartbeat_interval`` and closes the peer with TIMEOUT once no
  complete valid frame arrived for ``peer_timeout`` (not counting time our own
  back-pressure held the reader).
"""
from __future__ import annotations

import contextlib
import logging
import random
import statistics
import time
from collections import deque
from typing import Any, Callable, Iterator

import gevent
from gevent.event import AsyncResult, Event

from gp2p.errors import DisconnectReason, FrameTooLarge, PeerGone, PeerTimeout, ProtocolError
from gp2p.identity import short_id
from gp2p.messages import validate
from gp2p.tasks import GroupClosed, TaskGroup

log = logging.getLogger(__name__)

__all__ = ["Peer", "READY", "CLOSING", "CLOSED"]

READY, CLOSING, CLOSED = "ready", "closing", "closed"
#: the writer joins queued frames into one sendall up to about this many bytes
COALESCE_BYTES = 256 * 1024
RTT_SAMPLES = 16
MAX_OUTSTANDING_PINGS = 32

_now = time.monotonic


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
        self._out: deque[bytes] = deque()
        self._out_bytes = 0
        self._out_limit = config.out_queue_bytes
        self._wake = Event()
        self._room = Event()
        self._room.set()
        self._closing = Event()
        self._closed = Event()
        self._paused = 0
        self._resumed_at = self.connected_at
        self._pings: dict[int, tuple[float, AsyncResult | None]] = {}
        self._nonce = random.getrandbits(63)
        self._rtts: deque[float] = deque(maxlen=RTT_SAMPLES)
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
        if first_frames:
            self._out.append(first_frames)
            self._out_bytes += len(first_frames)
            self._wake.set()
        for name, fn in (("writer", self._write_loop), ("reader", self._read_loop),
                         ("heartbeat", self._heartbeat_loop)):
            self._greenlets[name] = self._tasks.spawn(name, fn)

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
        self._closing.set()
        self._wake.set()
        self._room.set()
        for _, result in self._pings.values():
            if result is not None and not result.ready():
                result.set_exception(PeerGone(f"{self!r} closed: {reason.name}"))
        current = gevent.getcurrent()
        for name in ("reader", "heartbeat"):
            greenlet = self._greenlets.get(name)
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
        if len(body) > self._max_frame:
            raise FrameTooLarge(f"message of {len(body)} bytes is above max_frame_size {self._max_frame}")
        return len(body).to_bytes(4, "big") + body

    def _append(self, data: bytes) -> None:
        self._out.append(data)
        self._out_bytes += len(data)
        if not self._wake.is_set():
            self._wake.set()

    def send_message(self, msg: dict, timeout: float | None = None) -> None:
        """Encode and queue ``msg``, waiting up to ``timeout`` (default ``send_timeout``)
        for room. See :meth:`send_frame`. Encoding errors propagate."""
        self.send_frame(self._frame(msg), timeout)

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

    @property
    def queued_bytes(self) -> int:
        """Bytes waiting in the out-queue."""
        return self._out_bytes

    def _write_loop(self) -> None:
        out = self._out
        wake = self._wake
        sendall = self._stream.sendall
        try:
            while True:
                if not out:
                    if self.state != READY:
                        return
                    wake.clear()
                    wake.wait()
                    continue
                data = out.popleft()
                if out and len(data) < COALESCE_BYTES:
                    parts = [data]
                    size = len(data)
                    while out and size < COALESCE_BYTES:
                        part = out.popleft()
                        parts.append(part)
                        size += len(part)
                    data = b"".join(parts)
                self._out_bytes -= len(data)
                if not self._room.is_set():
                    self._room.set()
                sendall(data)
        except OSError as exc:
            self.close(DisconnectReason.CONNECTION_LOST, f"write failed: {exc}", send=False)

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
        try:
            while self.state == READY:
                frames = self._reader.read_frames()
                while frames and self.state == READY:
                    msg = decode(frames.popleft())
                    handle(msg)
        except ProtocolError as exc:
            self._metrics.inc("protocol_errors")
            self.close(exc.reason, str(exc))
        except OSError as exc:
            self.close(DisconnectReason.CONNECTION_LOST, str(exc) or type(exc).__name__, send=False)

    def _handle(self, msg: Any) -> None:
        mtype = validate(msg)
        if mtype == "pong":
            entry = self._pings.pop(msg["nonce"], None)
            if entry is None:
                self._metrics.inc("unmatched_pongs")
                return
            now = _now()
            self.last_seen = now
            rtt = now - entry[0]
            self._rtts.append(rtt)
            if entry[1] is not None:
                entry[1].set(rtt)
            return
        self.last_seen = _now()
        if mtype == "ping":
            self.send_nowait({"type": "pong", "nonce": msg["nonce"]})
        elif mtype == "disconnect":
            reason = DisconnectReason.from_wire(msg["reason"])
            self.closed_by_remote = True
            self.close(reason, f"by remote: {msg.get('text', '')}".rstrip(": "), send=False)
        elif mtype in ("hello", "ack"):
            raise ProtocolError(f"{mtype} after the handshake")
        else:
            self._route(self, mtype, msg)

    # -- heartbeat and ping ------------------------------------------------------------

    def _new_ping(self, result: AsyncResult | None) -> int:
        self._nonce = (self._nonce + 1) % (2**64)
        if len(self._pings) >= MAX_OUTSTANDING_PINGS:
            self._pings.pop(next(iter(self._pings)))
        self._pings[self._nonce] = (_now(), result)
        return self._nonce

    def _heartbeat_loop(self) -> None:
        interval = self._config.heartbeat_interval
        timeout = self._config.peer_timeout
        next_ping = _now() + interval
        while self.state == READY:
            now = _now()
            if self._paused:
                deadline = now + timeout
            else:
                deadline = max(self.last_seen, self._resumed_at) + timeout
                if now >= deadline:
                    self.close(DisconnectReason.TIMEOUT,
                               f"silent for {now - self.last_seen:.2f}s")
                    return
            if now >= next_ping:
                self.send_nowait({"type": "ping", "nonce": self._new_ping(None)})
                next_ping = now + interval
            self._closing.wait(max(0.0, min(next_ping, deadline) - now))

    def ping(self, timeout: float = 5.0) -> float:
        """Send a ping and return the round-trip time in seconds.

        Raises :class:`PeerTimeout` if no pong comes within ``timeout``, or
        :class:`PeerGone` if the peer closes meanwhile.
        """
        result = AsyncResult()
        nonce = self._new_ping(result)
        try:
            self.send_message({"type": "ping", "nonce": nonce}, timeout=timeout)
            result.wait(timeout)
            if not result.ready():
                raise PeerTimeout(f"no pong from {self!r} within {timeout}s")
            return result.get()
        finally:
            self._pings.pop(nonce, None)

    @property
    def rtt(self) -> float | None:
        """Median of the recent round-trip times in seconds; None before the first sample."""
        return statistics.median(self._rtts) if self._rtts else None
