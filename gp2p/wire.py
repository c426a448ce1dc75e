"""The byte level of the protocol: the 6-byte preamble and length-prefixed frames.

``FrameDecoder`` is pure (bytes in, frame bodies out) so it can be fed anything in tests;
``FrameReader`` pulls bytes from a stream into it.
"""
from __future__ import annotations

import struct
from collections import deque
from typing import Any

from gp2p.errors import DisconnectReason, FrameTooLarge, ProtocolError

__all__ = [
    "MAGIC", "VERSION", "PREAMBLE_SIZE", "HEADER_SIZE", "RECV_CHUNK", "preamble",
    "parse_preamble", "frame", "FrameDecoder", "FrameReader", "StreamClosed",
]

MAGIC = b"GP2P"
VERSION = 1
PREAMBLE_SIZE = 6
HEADER_SIZE = 4
#: one recv() never asks for more than this (DESIGN: under 128 KiB)
RECV_CHUNK = 64 * 1024

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
    """Reads the preamble, then frames, from a stream with ``recv_into``."""

    def __init__(self, stream: Any, max_frame_size: int):
        self._stream = stream
        self._decoder = FrameDecoder(max_frame_size)
        self._chunk = bytearray(RECV_CHUNK)
        self._view = memoryview(self._chunk)
        self._raw = bytearray()
        self._ready: deque[bytes] = deque()
        self._preamble_done = False

    def _recv(self) -> memoryview:
        n = self._stream.recv_into(self._chunk)
        if not n:
            raise StreamClosed("connection closed by the remote end")
        return self._view[:n]

    def read_preamble(self) -> bytes:
        """The first ``PREAMBLE_SIZE`` bytes; bytes after them are kept for the frames."""
        while len(self._raw) < PREAMBLE_SIZE:
            self._raw += self._recv()
            if self._raw[:len(MAGIC)] != MAGIC[:len(self._raw)]:
                break  # wrong magic: no need to wait for the rest
        data = bytes(self._raw[:PREAMBLE_SIZE])
        # bytes after the preamble wait for read_frames(): the caller checks the preamble
        # first, and a frame error is raised where frames are read
        del self._raw[:PREAMBLE_SIZE]
        self._preamble_done = True
        return data

    def read_frames(self) -> deque[bytes]:
        """Block until at least one frame is complete; return every complete one.

        The returned deque is the reader's own: consume it before calling again.
        """
        ready = self._ready
        if self._raw:
            rest, self._raw = self._raw, bytearray()
            ready.extend(self._decoder.feed(rest))
        while not ready:
            ready.extend(self._decoder.feed(self._recv()))
        return ready

    def read_frame(self) -> bytes:
        """The next frame body."""
        return self.read_frames().popleft()

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._raw) + self._decoder.buffered + sum(len(f) for f in self._ready)
