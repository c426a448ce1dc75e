"""The byte level of the protocol: the 6-byte preamble and length-prefixed frames.

``FrameDecoder`` is pure (bytes in, frame bodies out) so it can be fed anything in tests;
``FrameReader`` does the same on a stream, receiving into a buffer shared by the thread's
connections and decoding frames where they lie.
"""
from __future__ import annotations

import struct
import weakref
from typing import Any, Callable

import gevent
import gevent.socket

from gp2p.errors import DisconnectReason, FrameTooLarge, ProtocolError

__all__ = [
    "MAGIC", "VERSION", "PREAMBLE_SIZE", "HEADER_SIZE", "RECV_CHUNK", "preamble",
    "parse_preamble", "frame", "FrameDecoder", "FrameReader", "StreamClosed", "nonblocking_send",
]

MAGIC = b"GP2P"
VERSION = 1
PREAMBLE_SIZE = 6
HEADER_SIZE = 4
#: one recv() never asks for more than this (DESIGN: under 128 KiB)
RECV_CHUNK = 120 * 1024
#: the buffer of a frame that spans receives starts at most this big, and doubles
BODY_STEP = 256 * 1024

_header = struct.Struct(">I")


class StreamClosed(ConnectionError):
    """The remote end closed the stream (EOF)."""


def preamble(codec_id: int, version: int = VERSION) -> bytes:
    """The 6 bytes a side sends first: magic, protocol version, codec id."""
    return MAGIC + bytes((version, codec_id))


def parse_preamble(data: bytes, supported_codecs: Any) -> int:
    """Check a received preamble; return its codec id or raise :class:`ProtocolError`."""
    if len(data) != PREAMBLE_SIZE or data[:4] != MAGIC:
        raise ProtocolError("bad magic")
    if data[4] != VERSION:
        raise ProtocolError(f"unsupported protocol version {data[4]}",
                            DisconnectReason.UNSUPPORTED_VERSION)
    if data[5] not in supported_codecs:
        raise ProtocolError(f"unsupported codec {data[5]}")
    return data[5]


def frame(body: bytes, max_frame_size: int) -> bytes:
    """``body`` with its 4-byte big-endian length in front."""
    if len(body) > max_frame_size:
        raise FrameTooLarge(f"frame of {len(body)} bytes is above max_frame_size {max_frame_size}")
    return _header.pack(len(body)) + body


class FrameDecoder:
    """Turns a byte stream, split anywhere, into frame bodies.

    Holds at most one unfinished frame (``HEADER_SIZE + max_frame_size``) plus the last
    chunk fed. A header above ``max_frame_size`` raises :class:`FrameTooLarge` before its
    body is read or allocated.
    """

    __slots__ = ("max_frame_size", "_buf")

    def __init__(self, max_frame_size: int):
        self.max_frame_size = max_frame_size
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet make a whole frame."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Add ``data``; return the bodies of every frame it completes, in order."""
        buf = self._buf
        if buf:
            buf += data
            view: Any = buf
        else:
            view = data
        size = len(view)
        limit = self.max_frame_size
        frames = []
        pos = 0
        while size - pos >= HEADER_SIZE:
            (length,) = _header.unpack_from(view, pos)
            if length > limit:
                raise FrameTooLarge(f"frame header announces {length} bytes (max {limit})")
            end = pos + HEADER_SIZE + length
            if end > size:
                break
            frames.append(bytes(view[pos + HEADER_SIZE:end]))
            pos = end
        if buf:
            del buf[:pos]
        elif pos < size:
            self._buf = bytearray(view[pos:])
        return frames


class FrameReader:
    """Reads the preamble, then frames, from a stream with ``recv_into``.

    Bytes are received into one buffer shared by every reader of the thread: a receive and
    the parsing of what it brought run without yielding, so no other reader can overwrite it
    meanwhile, and the frames it completes are decoded where they lie (or copied out) before
    the next one. A connection keeps only the frame it is in the middle of, in a buffer of
    that frame's size into which the rest is then received directly. An idle connection
    holds no receive buffer.

    (Handing the shared buffer itself to a connection in the middle of a large frame, and
    pooling spare buffers, saved that copy in theory; in a 64 KiB stream the receive always
    fills the buffer, so the unfinished frame never fitted, and the pool made glibc trim and
    re-fault the heap: several page faults per frame.)
    """

    __slots__ = ("_stream", "_max", "_buf", "_head", "_body", "_length", "_filled",
                 "_frames", "_error", "_raw", "received")

    def __init__(self, stream: Any, max_frame_size: int):
        self._stream = stream
        self._max = max_frame_size
        self._buf = _shared_buffer()
        self._head = b""                        # an unfinished header (under 4 bytes)
        self._body: bytearray | None = None     # the body of an unfinished frame, if any
        self._length = 0                        # ... its announced length
        self._filled = 0                        # ... and how much of it arrived
        self._frames: list[bytes] = []          # complete frames not yet read
        self._error: ProtocolError | None = None  # raised once the frames before it are used
        self._raw = b""                         # bytes that came with the preamble
        #: bytes received so far
        self.received = 0

    def _recv(self) -> memoryview:
        buf = self._buf
        n = self._stream.recv_into(buf)
        if not n:
            raise StreamClosed("connection closed by the remote end")
        self.received += n
        return memoryview(buf)[:n]

    def read_preamble(self) -> bytes:
        """The first ``PREAMBLE_SIZE`` bytes; bytes after them are kept for the frames."""
        raw = b""
        while len(raw) < PREAMBLE_SIZE:
            raw += self._recv()
            if raw[:len(MAGIC)] != MAGIC[:len(raw)]:
                break  # wrong magic: no need to wait for the rest
        # bytes after the preamble wait for read_frames(): the caller checks the preamble
        # first, and a frame error is raised where frames are read
        self._raw = raw[PREAMBLE_SIZE:]
        return raw[:PREAMBLE_SIZE]

    def read_frames(self) -> list[bytes]:
        """Block until at least one frame is complete; return every complete one (bodies).

        The returned list is the reader's own: consume it before calling again.
        """
        frames = self._frames
        while not frames:
            self._receive(bytes, frames)
        return frames

    def read_frame(self) -> bytes:
        """The next frame body."""
        return self.read_frames().pop(0)

    def read_messages(self, decode: Callable[[Any], Any]) -> list[Any]:
        """Like :meth:`read_frames`, with each body passed through ``decode`` as soon as it
        is complete (``decode`` gets a bytes-like object valid only during the call); the
        list returned is the caller's.

        A :class:`ProtocolError` (an oversized header, or one from ``decode``) is raised
        by the call after the one that returned the messages complete before it.
        """
        messages: list[Any] = []
        if self._frames:  # left over from the handshake, read as bytes
            frames, self._frames = self._frames, []
            try:
                for frame_ in frames:
                    messages.append(decode(frame_))
            except ProtocolError as exc:
                self._failed(exc, messages)
        while not messages:
            self._receive(decode, messages)
        return messages

    def _failed(self, exc: ProtocolError, out: list[Any]) -> None:
        """Raise ``exc`` now, or keep it for after the frames complete before it."""
        self._frames.clear()
        self._raw = self._head = b""
        self._body = None
        if not out:
            raise exc
        self._error = exc

    def _receive(self, decode: Callable[[Any], Any], out: list[Any]) -> None:
        """Receive once and put every frame it completes in ``out``."""
        if self._error is not None:
            raise self._error
        try:
            if self._raw:
                raw, self._raw = self._raw, b""
                self._parse(memoryview(raw), decode, out)
            elif self._body is not None:
                self._receive_body(decode, out)
            else:
                self._parse(self._recv(), decode, out)
        except ProtocolError as exc:
            self._failed(exc, out)

    def _receive_body(self, decode: Callable[[Any], Any], out: list[Any]) -> None:
        """The rest of an unfinished frame goes straight into its buffer."""
        body = self._body
        filled = self._filled
        length = self._length
        if filled == len(body):
            body = self._grow(filled + 1)
        n = self._stream.recv_into(memoryview(body)[filled:filled + RECV_CHUNK])
        if not n:
            raise StreamClosed("connection closed by the remote end")
        self.received += n
        self._filled = filled = filled + n
        if filled == length:
            self._body = None
            out.append(decode(body))

    def _grow(self, need: int) -> bytearray:
        """Make the unfinished frame's buffer hold at least ``need`` bytes.

        It starts at no more than ``BODY_STEP`` and doubles as bytes arrive, so a header
        alone never makes us allocate a whole ``max_frame_size``.
        """
        old = self._body
        body = bytearray(min(self._length, max(need, 2 * len(old))))
        body[:self._filled] = old[:self._filled]
        self._body = body
        return body

    def _start(self, length: int, data: memoryview, start: int) -> None:
        """A frame of ``length`` bytes begins at ``data[start:]`` and goes on later."""
        part = len(data) - start
        body = self._body = bytearray(min(length, max(BODY_STEP, part)))
        body[:part] = data[start:]
        self._length = length
        self._filled = part

    def _parse(self, data: memoryview, decode: Callable[[Any], Any], out: list[Any]) -> None:
        """Decode the frames ``data`` completes; keep an unfinished one."""
        size = len(data)
        pos = 0
        if self._head:  # finish the header in progress
            pos = min(HEADER_SIZE - len(self._head), size)
            head = self._head + bytes(data[:pos])
            self._head = b""
            if len(head) < HEADER_SIZE:
                self._head = head
                return
            length = self._check(_header.unpack(head)[0])
            if size - pos < length:
                self._start(length, data, pos)
                return
            out.append(decode(data[pos:pos + length]))
            pos += length
        limit = self._max
        unpack_from = _header.unpack_from
        while True:
            rest = size - pos
            if rest < HEADER_SIZE:
                if rest:
                    self._head = bytes(data[pos:])
                return
            (length,) = unpack_from(data, pos)
            if length > limit:
                self._check(length)
            start = pos + HEADER_SIZE
            pos = start + length
            if pos > size:
                self._start(length, data, start)
                return
            out.append(decode(data[start:pos]))

    def _check(self, length: int) -> int:
        if length > self._max:
            raise FrameTooLarge(f"frame header announces {length} bytes (max {self._max})")
        return length

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return (len(self._raw) + len(self._head) + (self._filled if self._body is not None else 0)
                + sum(len(f) for f in self._frames))


_shared: weakref.WeakKeyDictionary[Any, bytearray] = weakref.WeakKeyDictionary()


def _shared_buffer() -> bytearray:
    """The receive buffer of this thread's hub (every reader of a hub runs in its thread)."""
    hub = gevent.get_hub()
    buf = _shared.get(hub)
    if buf is None:
        buf = _shared[hub] = bytearray(RECV_CHUNK)
        # glibc gives freed memory at the top of the heap back to the system beyond 128 KiB,
        # and a stream of large messages fills and drains queues of megabytes: every frame
        # then page-faults again (~8 times per 64 KiB message, a fifth of its CPU). Freeing
        # one 8 MiB block raises that threshold to 16 MiB (malloc's documented dynamic mmap
        # threshold, see mallopt(3)); with another allocator it is only an allocation.
        bytearray(8 * 1024 * 1024)
    return buf


def nonblocking_send(stream: Any) -> Callable[[Any], int] | None:
    """A function writing what it can of some bytes to ``stream`` without ever waiting,
    returning how many it wrote; None when the stream offers no such thing.

    A stream may provide it as ``try_send``; a gevent socket (``stream.sock``) does with
    a zero timeout.
    """
    try_send = getattr(stream, "try_send", None)
    if try_send is not None:
        return try_send
    sock = getattr(stream, "sock", None)
    if not isinstance(sock, gevent.socket.socket):
        return None
    send = sock.send

    def send_now(data: Any) -> int:
        try:
            return send(data, 0, 0.0)
        except BlockingIOError:
            return 0

    return send_now
