"""Bench: gp2p against raw gevent sockets, measured side by side in the same run.

The raw twin uses the same 4-byte length framing and the same payloads, written here with
nothing but gevent sockets, so each ratio shows what gp2p's layers cost. In-process only
for now: both ends live in this process, as greenlets.
"""
from __future__ import annotations

import json
import statistics
import struct
import sys
import time
from typing import Any, Callable

from gevent import socket
from gevent.event import Event
from gevent.server import StreamServer

from gp2p.node import Node

__all__ = ["run_bench", "raw_pingpong", "raw_oneway", "gp2p_pingpong", "gp2p_oneway"]

_header = struct.Struct(">I")
HOSTS = ("127.0.100.1", "127.0.100.2")


def _read_exact(sock: socket.socket, n: int, buf: bytearray) -> bytes:
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:n])
        if not k:
            raise ConnectionError("closed")
        got += k
    return bytes(view[:n])


def _raw_pair(handler: Callable[[socket.socket], None]) -> tuple[StreamServer, socket.socket]:
    server = StreamServer((HOSTS[0], 0), lambda s, _a: handler(s))
    server.start()
    client = socket.create_connection(server.address, source_address=(HOSTS[1], 0))
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return server, client


def raw_pingpong(duration: float) -> dict[str, float]:
    """Round trips/s and RTT percentiles of framed echo over raw gevent sockets."""

    def echo(sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray(65536)
        try:
            while True:
                (n,) = _header.unpack(_read_exact(sock, 4, buf))
                body = _read_exact(sock, n, buf)
                sock.sendall(_header.pack(n) + body)
        except (ConnectionError, OSError):
            pass

    server, client = _raw_pair(echo)
    msg = _header.pack(16) + b"p" * 16
    buf = bytearray(65536)
    samples = []
    end = time.perf_counter() + duration
    try:
        while time.perf_counter() < end:
            t = time.perf_counter()
            client.sendall(msg)
            (n,) = _header.unpack(_read_exact(client, 4, buf))
            _read_exact(client, n, buf)
            samples.append(time.perf_counter() - t)
    finally:
        client.close()
        server.stop()
    return _rt_figures(samples, duration)


def raw_oneway(count: int, size: int) -> dict[str, float]:
    """Messages/s of ``count`` framed messages of ``size`` bytes, one sendall each."""
    done = Event()
    received = [0]

    def sink(sock: socket.socket) -> None:
        buf = bytearray(size + 64)
        try:
            while received[0] < count:
                (n,) = _header.unpack(_read_exact(sock, 4, buf))
                _read_exact(sock, n, buf)
                received[0] += 1
        except (ConnectionError, OSError):
            pass
        done.set()

    server, client = _raw_pair(sink)
    frame = _header.pack(size) + b"x" * size
    try:
        t = time.perf_counter()
        for _ in range(count):
            client.sendall(frame)
        done.wait(60)
        elapsed = time.perf_counter() - t
    finally:
        client.close()
        server.stop()
    return {"msgs_per_s": received[0] / elapsed}


def _gp2p_pair(codec: str) -> tuple[Node, Node, Any]:
    a = Node(listen=f"{HOSTS[0]}:0", codec=codec, heartbeat_interval=30, peer_timeout=120,
             network_id="gp2p-bench")
    b = Node(listen=f"{HOSTS[1]}:0", codec=codec, heartbeat_interval=30, peer_timeout=120,
             network_id="gp2p-bench")
    a.start()
    b.start()
    return a, b, b.connect(a.address)


def gp2p_pingpong(duration: float, codec: str = "msgpack") -> dict[str, float]:
    """Round trips/s and RTT percentiles of ``Peer.ping``."""
    a, b, peer = _gp2p_pair(codec)
    samples = []
    try:
        end = time.perf_counter() + duration
        while time.perf_counter() < end:
            t = time.perf_counter()
            peer.ping(5)
            samples.append(time.perf_counter() - t)
    finally:
        b.stop()
        a.stop()
    return _rt_figures(samples, duration)


def gp2p_oneway(count: int, size: int, codec: str = "msgpack") -> dict[str, float]:
    """Messages/s from ``node.send`` to the remote handler."""
    a, b, peer = _gp2p_pair(codec)
    done = Event()
    received = [0]

    @a.on("bench")
    def _(peer: Any, payload: Any) -> None:
        received[0] += 1
        if received[0] == count:
            done.set()

    payload = b"x" * size
    try:
        t = time.perf_counter()
        for _ in range(count):
            b.send(peer, "bench", payload)
        done.wait(60)
        elapsed = time.perf_counter() - t
    finally:
        b.stop()
        a.stop()
    return {"msgs_per_s": received[0] / elapsed}


def _rt_figures(samples: list[float], duration: float) -> dict[str, float]:
    samples.sort()
    return {"rt_per_s": len(samples) / duration,
            "p50_us": statistics.median(samples) * 1e6 if samples else 0.0,
            "p99_us": samples[int(len(samples) * 0.99)] * 1e6 if samples else 0.0}


def _row(name: str, unit: str, mine: float, raw: float | None) -> dict[str, Any]:
    ratio = mine / raw if raw else None
    shown = f"{ratio:.2f}" if ratio is not None else "n/a"
    raw_text = f"{raw:12,.0f}" if raw is not None else "         n/a"
    print(f"{name:<14} gp2p {mine:12,.0f} {unit:<6} raw {raw_text} {unit:<6} ratio {shown}",
          file=sys.stderr, flush=True)
    return {"gp2p": mine, "raw": raw, "ratio": ratio, "unit": unit}


def run_bench(args: Any) -> int:
    """The ``gp2p bench`` command."""
    duration = args.duration
    count = max(2000, int(20000 * duration))
    results: dict[str, Any] = {}
    print(f"gp2p bench, in one process, codec {args.codec}, {duration:g} s per figure",
          file=sys.stderr, flush=True)
    raw = raw_pingpong(duration)
    mine = gp2p_pingpong(duration, args.codec)
    results["pingpong"] = _row("pingpong", "rt/s", mine["rt_per_s"], raw["rt_per_s"])
    results["pingpong"].update(p50_us=mine["p50_us"], p99_us=mine["p99_us"],
                               raw_p50_us=raw["p50_us"], raw_p99_us=raw["p99_us"])
    print(f"{'':<14} p50 {mine['p50_us']:.0f} us (raw {raw['p50_us']:.0f}), "
          f"p99 {mine['p99_us']:.0f} us (raw {raw['p99_us']:.0f})", file=sys.stderr)
    raw = raw_oneway(count, 100)
    mine = gp2p_oneway(count, 100, args.codec)
    results["oneway_100"] = _row("oneway_100", "msg/s", mine["msgs_per_s"], raw["msgs_per_s"])
    big = max(200, count // 50)
    raw = raw_oneway(big, 65536)
    mine = gp2p_oneway(big, 65536, args.codec)
    results["oneway_64k"] = _row("oneway_64k", "MB/s", mine["msgs_per_s"] * 65536 / 1e6,
                                 raw["msgs_per_s"] * 65536 / 1e6)
    if args.json:
        print(json.dumps({"inproc": results}), flush=True)
    return 0
