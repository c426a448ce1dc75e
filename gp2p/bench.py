"""Bench: gp2p against raw gevent sockets, measured side by side in the same run.

Each figure has two twins, measured one after the other with the same loop shape (a warm-up,
then ``duration`` seconds timed): gp2p's, and a raw one written here with nothing but gevent
sockets, the same 4-byte big-endian length framing and the same payloads. The raw readers
``recv`` up to 64 KiB at a time and cut frames out of their buffer, as gp2p's reader does; the
raw writers make one ``sendall`` per frame (no batching). The ratio gp2p/raw is what gp2p's
layers cost.

- ``pingpong``: ``Peer.ping`` round trips/s and RTT p50/p99, against a framed echo of a 16-byte
  frame.
- ``request``: ``node.request`` round trips/s through a remote handler that returns its 100-byte
  payload. Its raw twin is the same framed echo loop as pingpong's, with the 100-byte payload:
  over a raw socket a request/response is nothing more than an echo.
- ``oneway_100``: ``node.send`` of 100-byte payloads, counted by the remote handler, messages/s;
  raw: one ``sendall`` per 100-byte frame, counted by a framed reader.
- ``oneway_64k``: the same with 64 KiB payloads, in MB/s of payload.
- ``broadcast``: ``node.broadcast`` of 100-byte payloads from a node whose only peers are 10
  nodes (which relay to nobody), in broadcasts/s fully delivered (all 10 peers' handlers ran).
  Raw twin: the same frame fanned out to 10 sockets (10 ``sendall`` per broadcast), counted by
  10 framed readers. That is what a broadcast to 10 peers is on the wire; what gp2p adds (an id,
  the seen-cache, one encode for all peers, the origin's own delivery) is what the ratio shows.

One-way figures send for ``duration`` seconds, then synchronise: the raw twin sends an empty
frame that the far reader answers with its count (the stream is ordered, so it has read every
frame before), the gp2p twin a ``request`` that the far node answers once its handler has
counted everything this node sent. The rate is what was sent over the time until that answer.

Modes: ``inproc`` starts the far end (:class:`~gp2p.benchfar.FarEnd`: raw echo and sink servers, a gp2p node
with the bench handlers, 10 more nodes for broadcast) as greenlets in this process, on
127.0.100.x; ``twoproc`` starts it in a child process, ``python -m gp2p.bench --serve``, on
127.0.101.x: it prints its addresses as one JSON line and serves until its stdin closes, so it
never outlives its parent. The near side (127.0.100.2) runs the same code in both modes.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import gevent
from gevent import socket, subprocess

from gp2p.benchfar import (FANOUT, NODE_FIELDS, SYNC_TIMEOUT, FarEnd, count_struct, frames,
                           header, nodelay, serve)
from gp2p.node import Node

__all__ = ["FIGURES", "FarEnd", "run_bench", "serve", "main"]

#: figure -> unit, in the order they run
FIGURES = {"pingpong": "rt/s", "request": "rt/s", "oneway_100": "msg/s", "oneway_64k": "MB/s",
           "broadcast": "bcast/s"}
PING_SIZE = 16
SMALL = 100
BIG = 65536
NEAR_HOST = "127.0.100.2"
FAR_PREFIX = {"inproc": "127.0.100", "twoproc": "127.0.101"}
CHILD_START_TIMEOUT = 60.0
#: a warm-up lasts ``duration / 5`` (at most 0.5 s) or this many calls, whichever ends first,
#: so that the queue it leaves behind drains quickly
WARMUP_LIMIT = 2000



class BenchError(RuntimeError):
    """A measurement could not be made (the far end died, a count came out wrong)."""


@contextmanager
def _child(codec: str) -> Iterator[dict[str, Any]]:
    """A twoproc far end in a child process; it is gone when this exits."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    level = logging.getLevelName(logging.getLogger("gp2p").getEffectiveLevel())
    proc = subprocess.Popen([sys.executable, "-m", "gp2p.bench", "--serve", "--codec", codec,
                             "--prefix", FAR_PREFIX["twoproc"], "--log-level", str(level)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    try:
        with gevent.Timeout(CHILD_START_TIMEOUT, BenchError("the far end process did not start")):
            line = proc.stdout.readline()
        if not line:
            raise BenchError(f"the far end process exited with {proc.wait()} before starting")
        print(f"twoproc: far end is process {proc.pid} on {FAR_PREFIX['twoproc']}.x",
              file=sys.stderr, flush=True)
        yield json.loads(line)
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


@contextmanager
def _far_end(mode: str, codec: str) -> Iterator[dict[str, Any]]:
    if mode == "twoproc":
        with _child(codec) as addresses:
            yield addresses
        return
    far = FarEnd(FAR_PREFIX["inproc"], codec)
    try:
        yield far.start()
    finally:
        far.stop()


# -- loop shapes, shared by both twins -----------------------------------------------------


@dataclass
class Run:
    """What a figure needs: the far end's addresses and the timing."""
    far: dict[str, Any]
    codec: str
    duration: float
    warmup: float


def _spin(once: Callable[[], Any], seconds: float, limit: float = float("inf")) -> int:
    n = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end and n < limit:
        once()
        n += 1
    return n


def _round_trips(once: Callable[[], Any], run: Run) -> dict[str, float]:
    """Round trips/s and RTT percentiles of ``once``, called in a loop."""
    _spin(once, run.warmup, WARMUP_LIMIT)
    samples = []
    start = t = time.perf_counter()
    end = start + run.duration
    while t < end:
        once()
        now = time.perf_counter()
        samples.append(now - t)
        t = now
    samples.sort()
    return {"rate": len(samples) / (t - start), "p50_us": statistics.median(samples) * 1e6,
            "p99_us": samples[min(len(samples) - 1, int(len(samples) * 0.99))] * 1e6}


def _stream(send_one: Callable[[], Any], sync: Callable[[int], None], run: Run) -> dict[str, float]:
    """Sends/s: ``send_one`` for ``duration``, then ``sync(total)`` returns once the far end
    has counted all of them."""
    warm = _spin(send_one, run.warmup, WARMUP_LIMIT)
    sync(warm)
    start = time.perf_counter()
    sent = _spin(send_one, run.duration)
    sync(warm + sent)
    return {"rate": sent / (time.perf_counter() - start)}


# -- the raw twins -------------------------------------------------------------------------


def _split(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host, int(port)


def _raw_connect(stack: ExitStack, address: str) -> tuple[socket.socket, Iterator[bytes]]:
    sock = socket.create_connection(_split(address), source_address=(NEAR_HOST, 0))
    stack.callback(sock.close)
    nodelay(sock)
    return sock, frames(sock)


def raw_echo(run: Run, size: int) -> dict[str, float]:
    """Framed echo round trips over a raw socket (pingpong's and request's twin)."""
    frame = header.pack(size) + b"p" * size
    with ExitStack() as stack:
        sock, frames = _raw_connect(stack, run.far["echo"])

        def once() -> None:
            sock.sendall(frame)
            next(frames)

        return _round_trips(once, run)


def raw_fanout(run: Run, size: int, ways: int = 1) -> dict[str, float]:
    """Frames of ``size`` bytes, each sent to ``ways`` sockets with one sendall per socket."""
    frame = header.pack(size) + b"x" * size
    with ExitStack() as stack:
        conns = [_raw_connect(stack, run.far["sink"]) for _ in range(ways)]
        socks = [sock for sock, _ in conns]

        def send_one() -> None:
            for sock in socks:
                sock.sendall(frame)

        def sync(total: int) -> None:
            for sock in socks:
                sock.sendall(header.pack(0))
            for _, frames in conns:
                (count,) = count_struct.unpack(next(frames))
                if count != total:
                    raise BenchError(f"the raw sink counted {count} frames, not {total}")

        return _stream(send_one, sync, run)


# -- the gp2p twins ------------------------------------------------------------------------


@contextmanager
def _near_node(run: Run) -> Iterator[Node]:
    node = Node(listen=f"{NEAR_HOST}:0", codec=run.codec, **NODE_FIELDS)
    node.start()
    try:
        yield node
    finally:
        node.stop()


def _sync(node: Node, peers: list[Any], total: int) -> None:
    for peer in peers:
        count = node.request(peer, "bench.count", total, timeout=SYNC_TIMEOUT + 5)
        if count != total:
            raise BenchError(f"{peer!r} counted {count} messages, not {total}")


def gp2p_pingpong(run: Run) -> dict[str, float]:
    with _near_node(run) as node:
        peer = node.connect(run.far["node"])
        return _round_trips(lambda: peer.ping(5.0), run)


def gp2p_request(run: Run) -> dict[str, float]:
    payload = b"p" * SMALL
    with _near_node(run) as node:
        peer = node.connect(run.far["node"])
        return _round_trips(lambda: node.request(peer, "bench.echo", payload, timeout=5.0), run)


def gp2p_oneway(run: Run, size: int) -> dict[str, float]:
    payload = b"x" * size
    with _near_node(run) as node:
        peer = node.connect(run.far["node"])
        return _stream(lambda: node.send(peer, "bench.sink", payload), lambda n: _sync(node, [peer], n), run)


def gp2p_broadcast(run: Run) -> dict[str, float]:
    payload = b"x" * SMALL
    with _near_node(run) as node:
        node.on("bench.bcast")(lambda peer, payload: None)
        peers = [node.connect(address) for address in run.far["fanout"]]
        return _stream(lambda: node.broadcast("bench.bcast", payload), lambda n: _sync(node, peers, n), run)


#: figure -> (gp2p twin, raw twin, factor from sends/s to the unit)
_TWINS: dict[str, tuple[Callable[[Run], dict], Callable[[Run], dict], float]] = {
    "pingpong": (gp2p_pingpong, lambda run: raw_echo(run, PING_SIZE), 1.0),
    "request": (gp2p_request, lambda run: raw_echo(run, SMALL), 1.0),
    "oneway_100": (lambda run: gp2p_oneway(run, SMALL), lambda run: raw_fanout(run, SMALL), 1.0),
    "oneway_64k": (lambda run: gp2p_oneway(run, BIG), lambda run: raw_fanout(run, BIG), BIG / 1e6),
    "broadcast": (gp2p_broadcast, lambda run: raw_fanout(run, SMALL, FANOUT), 1.0),
}


def measure(name: str, run: Run) -> dict[str, Any]:
    """One figure: the raw twin, then the gp2p twin, and their ratio."""
    mine_fn, raw_fn, factor = _TWINS[name]
    raw = raw_fn(run)
    mine = mine_fn(run)
    row: dict[str, Any] = {"gp2p": round(mine["rate"] * factor, 1), "raw": round(raw["rate"] * factor, 1),
                           "ratio": round(mine["rate"] / raw["rate"], 4), "unit": FIGURES[name]}
    if "p50_us" in mine:
        row.update(p50_us=round(mine["p50_us"], 1), p99_us=round(mine["p99_us"], 1),
                   raw_p50_us=round(raw["p50_us"], 1), raw_p99_us=round(raw["p99_us"], 1))
    return row


# -- the command ---------------------------------------------------------------------------


def _format(mode: str, name: str, row: dict[str, Any]) -> str:
    ratio = f"{row['ratio']:.2f}" if row["ratio"] is not None else "n/a"
    raw = f"{row['raw']:12,.0f}" if row["raw"] is not None else f"{'n/a':>12}"
    text = f"{mode:<8} {name:<11} {row['gp2p']:12,.0f} {raw} {ratio:>6}  {row['unit']:<8}"
    if "p50_us" in row:
        text += (f"p50 {row['p50_us']:.0f} us (raw {row['raw_p50_us']:.0f}), "
                 f"p99 {row['p99_us']:.0f} us (raw {row['raw_p99_us']:.0f})")
    return text.rstrip()


def _chosen(only: list[str] | None) -> list[str]:
    unknown = sorted(set(only or ()) - set(FIGURES))
    if unknown:
        raise ValueError(f"unknown figure {', '.join(unknown)}: choose from {', '.join(FIGURES)}")
    return [name for name in FIGURES if not only or name in only]


def run_bench(args: Any) -> int:
    """The ``gp2p bench`` command: the table on stdout, and with ``--json`` one JSON object
    as the last line."""
    try:
        names = _chosen(getattr(args, "only", None))
    except ValueError as exc:
        print(f"gp2p bench: {exc}", file=sys.stderr)
        return 2
    mode = getattr(args, "mode", "both")
    modes = ("inproc", "twoproc") if mode == "both" else (mode,)
    duration = args.duration
    warmup = min(0.5, duration / 5)
    began = time.perf_counter()
    print(f"gp2p bench: gp2p against raw gevent sockets, codec {args.codec}, "
          f"{duration:g} s per measurement after {warmup:g} s of warm-up", flush=True)
    print(f"{'mode':<8} {'figure':<11} {'gp2p':>12} {'raw':>12} {'ratio':>6}  unit", flush=True)
    results: dict[str, dict[str, Any]] = {}
    for mode in modes:
        results[mode] = {}
        with _far_end(mode, args.codec) as far:
            run = Run(far, args.codec, duration, warmup)
            for name in names:
                results[mode][name] = row = measure(name, run)
                print(_format(mode, name, row), flush=True)
    print(f"done in {time.perf_counter() - began:.1f} s", flush=True)
    if args.json:
        print(json.dumps(results), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m gp2p.bench --serve``: the far end of ``gp2p bench --mode twoproc``."""
    parser = argparse.ArgumentParser(prog="python -m gp2p.bench",
                                     description="The far end of gp2p bench's twoproc mode: prints "
                                                 "its addresses as one JSON line, serves until stdin closes.")
    parser.add_argument("--serve", action="store_true", required=True)
    parser.add_argument("--prefix", default=FAR_PREFIX["twoproc"], help="first three bytes of its hosts")
    parser.add_argument("--codec", default="msgpack", choices=("msgpack", "json"))
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, args.log_level.upper(), logging.WARNING),
                        format="%(asctime)s %(levelname)s bench-far %(name)s: %(message)s")
    return serve(args.prefix, args.codec)


if __name__ == "__main__":
    sys.exit(main())
