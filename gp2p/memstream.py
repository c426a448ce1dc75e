"""One end of an in-memory connection (:class:`MemoryStream`), for :mod:`gp2p.memnet`.

Bytes travel as chunks stamped with the time they are due (the link's latency), a FIN is an
empty chunk, and a reader or writer that must wait parks on a gevent ``Waiter``; the network
(:class:`gp2p.memnet.MemoryNetwork`) owns links, partitions, resets and stats.
"""
from __future__ import annotations

import errno
import time
from typing import TYPE_CHECKING, Any

from gevent._waiter import Waiter
from gevent.exceptions import ConcurrentObjectUseError

from gp2p.config import format_address

if TYPE_CHECKING:
    from gp2p.memnet import MemoryNetwork

__all__ = ["MemoryStream", "RECV_BUFFER"]

#: bytes a stream end holds unread before its writer's ``sendall`` blocks
RECV_BUFFER = 256 * 1024
_FIN = b""  # the chunk that stands for a FIN (sendall never queues empty data)
_now = time.monotonic


def wake(waiter: Waiter | None) -> None:
    if waiter is not None:
        waiter.hub.loop.run_callback(waiter.switch, None)


class Link:
    """What two IPs share: a latency (None = the network's default) and a partition."""

    __slots__ = ("latency", "since", "refs")

    def __init__(self, latency: float | None, since: float | None):
        self.latency = latency
        #: monotonic time the link was partitioned, None while it is not
        self.since = since
        self.refs = 0


class MemoryStream:
    """One end of an in-memory connection: the interface of :class:`gp2p.transport.Stream`,
plus ``try_send`` (queue what fits without waiting), which :mod:`gp2p.peer` uses when
a stream has it."""

    __slots__ = ("_net", "_link", "_peer", "_chunks", "_head", "_offset", "_unread", "_fin_at",
                 "_error", "_closed", "_rwaiter", "_wwaiter", "_owns_port", "local_ip", "local_port",
                 "remote_ip", "remote_port")

    def __init__(self, net: "MemoryNetwork", link: Link, local: tuple[str, int], remote: tuple[str, int],
                 owns_port: bool):
        self._net = net
        self._link = link
        self._peer: MemoryStream | None = None
        self._chunks: list[tuple[float, bytes]] = []  # (due, data); data == _FIN for a FIN
        self._head = 0        # index of the first unread chunk
        self._offset = 0      # bytes of the head chunk already read
        self._unread = 0      # bytes queued here, not yet read (held ones included)
        self._fin_at: float | None = None  # when the remote's FIN is due here
        self._error = 0       # ECONNRESET (an RST came) or EPIPE (our write hit a closed end)
        self._closed = False
        self._rwaiter: Waiter | None = None
        self._wwaiter: Waiter | None = None
        self._owns_port = owns_port
        self.local_ip, self.local_port = local
        self.remote_ip, self.remote_port = remote

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<MemoryStream {self.local_address} -> {self.remote_address}{state}>"

    @property
    def local_address(self) -> str:
        return format_address(self.local_ip, self.local_port)

    @property
    def remote_address(self) -> str:
        """``ip:port`` of the other end (not its listen address)."""
        return format_address(self.remote_ip, self.remote_port)

    # -- waiting -----------------------------------------------------------------------

    def _block(self, slot: str, delay: float | None = None) -> None:
        """Wait until woken (or ``delay`` passes); callers re-check their condition."""
        if getattr(self, slot) is not None:
            raise ConcurrentObjectUseError(f"{self!r} is already used by another greenlet")
        waiter = Waiter()
        setattr(self, slot, waiter)
        timer = None
        if delay is not None:
            timer = waiter.hub.loop.timer(max(delay, 0.0))
            timer.start(waiter.switch, None)
        try:
            waiter.get()
        finally:
            if getattr(self, slot) is waiter:
                setattr(self, slot, None)
            if timer is not None:
                timer.close()

    def _wake_all(self) -> None:
        reader, writer = self._rwaiter, self._wwaiter
        self._rwaiter = self._wwaiter = None
        wake(reader)
        wake(writer)

    def _check_open(self) -> None:
        if self._closed:
            raise OSError(errno.EBADF, "Bad file descriptor (stream closed)")

    # -- receiving ---------------------------------------------------------------------

    def recv_into(self, buffer: Any, nbytes: int = 0) -> int:
        """Copy arrived bytes into ``buffer``; block until some arrive; 0 at EOF."""
        view = memoryview(buffer).cast("B")
        want = nbytes or len(view)
        while True:
            self._check_open()
            n = self._read(view, want)
            if n is not None:
                return n
            if self._error == errno.ECONNRESET:
                self._drop_unread()
                raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
            chunks, link = self._chunks, self._link
            if self._head < len(chunks):
                due = chunks[self._head][0]
                if link.since is not None and due > link.since:
                    self._net._stalled.add(self)
                    try:
                        self._block("_rwaiter")
                    finally:
                        self._net._stalled.discard(self)
                else:
                    self._block("_rwaiter", due - _now())
            else:
                self._block("_rwaiter")

    def _read(self, view: memoryview, want: int) -> int | None:
        """Copy the chunks that have arrived; None when none has (0 at a FIN)."""
        chunks = self._chunks
        head = self._head
        if head >= len(chunks):
            return None
        since = self._link.since
        now = _now()
        copied = 0
        while head < len(chunks) and copied < want:
            due, data = chunks[head]
            if due > now or (since is not None and due > since):
                break
            if data is _FIN:
                if not copied:
                    self._head = head
                    return 0
                break
            offset = self._offset
            take = min(len(data) - offset, want - copied)
            view[copied:copied + take] = memoryview(data)[offset:offset + take]
            copied += take
            if offset + take == len(data):
                head += 1
                self._offset = 0
            else:
                self._offset = offset + take
        if not copied:
            return None
        if head >= len(chunks):
            chunks.clear()
            head = 0
        elif head > 64 and head * 2 > len(chunks):
            del chunks[:head]
            head = 0
        self._head = head
        self._unread -= copied
        self._net.bytes_delivered += copied
        peer = self._peer
        if peer._wwaiter is not None and self._unread < RECV_BUFFER:
            writer, peer._wwaiter = peer._wwaiter, None
            wake(writer)
        return copied

    def _drop_unread(self) -> None:
        self._chunks = []
        self._head = self._offset = self._unread = 0

    # -- sending -----------------------------------------------------------------------

    def _push(self, data: bytes) -> None:
        """Queue ``data`` (or the FIN) here, due after the link's latency."""
        latency = self._link.latency
        if latency is None:
            latency = self._net.latency
        due = _now() + latency
        chunks = self._chunks
        if self._head < len(chunks):
            if chunks[-1][0] > due:  # latency lowered meanwhile: stay in order
                due = chunks[-1][0]
        elif self._rwaiter is not None:  # only a new head changes what the reader waits for
            reader, self._rwaiter = self._rwaiter, None
            wake(reader)
        chunks.append((due, data))
        if data is _FIN:
            self._fin_at = due
        else:
            self._unread += len(data)

    def sendall(self, data: Any) -> None:
        """Queue all of ``data`` for the other end, blocking while its buffer is full."""
        view = self._sendable(data)
        size = len(view)
        pos = self._send_some(data, view, 0)
        while pos < size:
            self._block("_wwaiter")
            self._check_open()
            if self._error:
                self._raise_error()
            pos = self._send_some(data, view, pos)

    def try_send(self, data: Any) -> int:
        """Queue what fits of ``data`` without waiting; return how many bytes that was."""
        return self._send_some(data, self._sendable(data), 0)

    def _sendable(self, data: Any) -> memoryview:
        """Check this end can send (one send call: maybe a random reset); ``data`` as bytes."""
        self._check_open()
        if self._error:
            self._raise_error()
        net = self._net
        if net.reset_probability and net._random.random() < net.reset_probability:
            net.resets += 1
            self._error = errno.ECONNRESET  # this end learns at once; the other when the RST gets there
            self._wake_all()
            net._reset(self._peer)
            self._raise_error()
        return memoryview(data).cast("B")

    def _send_some(self, data: Any, view: memoryview, pos: int) -> int:
        """Queue what fits of ``view[pos:]`` at the other end; return the new position."""
        size = len(view)
        peer = self._peer
        while pos < size:
            if peer._closed:
                self._write_to_closed()
                return size
            room = RECV_BUFFER - peer._unread
            if room <= 0:
                break
            if pos == 0 and size <= room and type(data) is bytes:
                chunk = data
            else:
                chunk = view[pos:pos + room].tobytes()
            peer._push(chunk)
            pos += len(chunk)
        return pos

    def _write_to_closed(self) -> None:
        """The remote end is closed: its kernel would answer with a reset once our bytes
        reach it. The first write is dropped; later ones raise."""
        link = self._link
        fin = self._fin_at
        arrived = fin is not None and fin <= _now() and (link.since is None or fin <= link.since)
        if self._error:
            self._raise_error()
        if link.since is None and arrived:
            self._error = errno.EPIPE

    def _raise_error(self) -> None:
        if self._error == errno.EPIPE:
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")
        raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")

    # -- closing -----------------------------------------------------------------------

    def close(self) -> None:
        """Close this end (a FIN to the other); safe to call twice."""
        if self._closed:
            return
        self._release()
        peer = self._peer
        if not peer._closed and peer._error != errno.ECONNRESET:
            peer._push(_FIN)
            wake(peer._wwaiter)  # a writer waiting for our buffer finds it closed
            peer._wwaiter = None

    def abort(self) -> None:
        """Close with a reset instead of a FIN (as a crash would); safe to call twice."""
        if self._closed:
            return
        self._release()
        self._net.resets += 1
        self._net._reset(self._peer)

    def _release(self) -> None:
        self._closed = True
        self._drop_unread()
        self._wake_all()  # greenlets blocked on this end see it closed
        self._net._end_closed(self)
