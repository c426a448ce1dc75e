"""Swarm: many nodes as greenlets in one process, and the figures that show them working.

Each node listens on its own loopback address (127.1.x.y) and dials from it. Every node
knows only node 0 (its seed); discovery (getaddr/addr) does the rest. The run measures how
long the network takes to converge (every node has ``min(outbound, N-1)`` ready outbound
peers and the graph is connected),
waits for heartbeat round trips on every connection, has every node send messages to each
of its peers, and counts the deliveries.
"""
from __future__ import annotations

import gc
import json
import logging
import random
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import gevent
from gevent.greenlet import Greenlet

from gp2p.config import Config
from gp2p.node import Node

log = logging.getLogger(__name__)

__all__ = ["Swarm", "SwarmResult", "swarm_address", "connected_components"]

KIND = "swarm.msg"
GOSSIP_KIND = "swarm.gossip"


def swarm_address(index: int) -> str:
    """The listen address of node ``index``: 127.1.0.1, 127.1.0.2, ... 127.1.1.1, ..."""
    return f"127.{1 + index // 62500}.{(index // 250) % 250}.{index % 250 + 1}:0"


def connected_components(edges: dict[int, set[int]], members: list[int]) -> int:
    """How many connected components ``members`` form under ``edges`` (pure)."""
    seen: set[int] = set()
    components = 0
    for start in members:
        if start in seen:
            continue
        components += 1
        stack = [start]
        seen.add(start)
        while stack:
            for other in edges.get(stack.pop(), ()):
                if other not in seen:
                    seen.add(other)
                    stack.append(other)
    return components


@dataclass
class SwarmResult:
    """What a run measured; ``None`` where it does not apply or was not reached."""

    nodes: int
    heartbeat_interval: float
    peer_timeout: float
    converge_s: float | None = None
    connections: int | None = None
    deliveries: int = 0
    expected: int = 0
    rtt_median_ms: float | None = None
    rtt_samples: int = 0
    broadcasts: int = 0
    coverage: float | None = None
    redundancy: float | None = None
    hops_max: int | None = None
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    greenlets_per_connection: float | None = None
    rss_mb: float | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.converge_s is not None and self.deliveries == self.expected
                and (not self.broadcasts or self.coverage == 1.0) and not self.errors)

    def summary(self) -> str:
        conv = f"{self.converge_s:.2f} s" if self.converge_s is not None else "NOT converged"
        rtt = f"{self.rtt_median_ms:.2f} ms" if self.rtt_median_ms is not None else "n/a"
        lines = [
            f"nodes {self.nodes}, connections {self.connections}, heartbeat "
            f"{self.heartbeat_interval:g} s / timeout {self.peer_timeout:g} s",
            f"converged in {conv}",
            f"deliveries {self.deliveries}/{self.expected}",
            f"median RTT {rtt} ({self.rtt_samples} connection ends sampled)",
        ]
        if self.broadcasts:
            lines.append(f"broadcasts {self.broadcasts}: coverage {self.coverage:.4f}, redundancy "
                         f"{self.redundancy:.2f} copies per delivery, max hops {self.hops_max}, "
                         f"latency p50 {self.latency_p50_ms:.1f} ms p99 {self.latency_p99_ms:.1f} ms")
        if self.greenlets_per_connection is not None:
            lines.append(f"greenlets per connection end {self.greenlets_per_connection:.2f}, "
                         f"RSS {self.rss_mb:.0f} MiB")
        lines.extend(f"error: {e}" for e in self.errors)
        lines.append("OK" if self.ok else "FAILED")
        return "\n".join(lines)

    def to_json(self) -> str:
        data = asdict(self)
        data["ok"] = self.ok
        return json.dumps(data)


class Swarm:
    """Runs ``n`` nodes in this process. ``run()`` returns a :class:`SwarmResult`."""

    def __init__(self, n: int = 20, outbound: int = 8, messages: int = 5, broadcasts: int = 10,
                 seed: int | None = None,
                 heartbeat_interval: float | None = None, peer_timeout: float | None = None,
                 converge_timeout: float = 60.0, progress: Callable[[str], None] | None = None,
                 **config: Any):
        if n < 2:
            raise ValueError("a swarm needs at least 2 nodes")
        self.n = n
        self.outbound = max(1, outbound)
        self.messages = messages
        self.broadcasts = broadcasts
        #: broadcast id -> perf_counter() at the broadcast() call
        self._sent_at: dict[str, float] = {}
        #: broadcast id -> node indexes whose handler ran, and the latencies seen
        self._got: dict[str, set[int]] = {}
        self._latencies: list[float] = []
        self.duplicate_deliveries = 0
        self.random = random.Random(seed)
        hb = heartbeat_interval or 2.0
        self.heartbeat_interval = hb
        self.peer_timeout = peer_timeout or max(5.0, 2.5 * hb)
        self.converge_timeout = converge_timeout
        self.progress = progress or (lambda line: None)
        self.config = config
        self.nodes: list[Node] = []
        self.deliveries = 0
        self.want = min(self.outbound, n - 1)

    def _make_nodes(self) -> None:
        for i in range(self.n):
            bootstrap = [self.nodes[0].address] if i else []
            node = Node(config=Config(listen=swarm_address(i), bootstrap=bootstrap,
                                      target_outbound=self.outbound,
                                      heartbeat_interval=self.heartbeat_interval,
                                      peer_timeout=self.peer_timeout,
                                      network_id="gp2p-swarm", **self.config))
            node.on(KIND)(self._delivered)
            node.on(GOSSIP_KIND, context=True)(self._gossip_handler(i))
            node.start()
            self.nodes.append(node)

    def _delivered(self, peer: Any, payload: Any) -> None:
        self.deliveries += 1

    def _gossip_handler(self, index: int) -> Callable[[Any, Any, Any], None]:
        def handler(peer: Any, payload: Any, ctx: Any) -> None:
            got = self._got.setdefault(ctx.msg_id, set())
            if index in got:
                self.duplicate_deliveries += 1
            got.add(index)
            if peer is not None:
                sent = self._sent_at.get(ctx.msg_id)
                if sent is not None:
                    self._latencies.append(time.perf_counter() - sent)
        return handler

    def _edges(self) -> tuple[dict[int, set[int]], int]:
        index = {node.id: i for i, node in enumerate(self.nodes)}
        edges: dict[int, set[int]] = {}
        ends = 0
        for i, node in enumerate(self.nodes):
            for peer in node.peers:
                ends += 1
                j = index.get(peer.id)
                if j is not None:
                    edges.setdefault(i, set()).add(j)
        return edges, ends

    def converged(self) -> bool:
        """Every node has ``min(outbound, N-1)`` outbound peers (or is already connected to
        every other node, so that none is left to dial), and the graph is one component."""
        for node in self.nodes:
            peers = node.peers
            if (sum(1 for p in peers if p.direction == "outbound") < self.want
                    and len(peers) < self.n - 1):
                return False
        edges, _ = self._edges()
        return connected_components(edges, list(range(self.n))) == 1

    def _wait(self, predicate: Callable[[], bool], timeout: float, label: str) -> float | None:
        start = time.monotonic()
        last_report = 0.0
        while True:
            if predicate():
                return time.monotonic() - start
            elapsed = time.monotonic() - start
            if elapsed > timeout:
                return None
            if elapsed - last_report >= 1.0:
                last_report = elapsed
                self.progress(self._status(label, elapsed))
            gevent.sleep(0.05)

    def _status(self, label: str, elapsed: float) -> str:
        _, ends = self._edges()
        up = sum(1 for node in self.nodes if node.started and not node.closed)
        return (f"[{label} {elapsed:5.1f}s] nodes up {up}/{self.n}, connections {ends // 2}, "
                f"deliveries {self.deliveries}")

    def run(self) -> SwarmResult:
        result = SwarmResult(nodes=self.n, heartbeat_interval=self.heartbeat_interval,
                             peer_timeout=self.peer_timeout)
        try:
            self._run(result)
        finally:
            self.stop()
        return result

    def _run(self, result: SwarmResult) -> None:
        self.progress(f"starting {self.n} nodes on 127.1.x.y; each knows only node 0 and "
                      f"keeps {self.want} outbound connections found by discovery")
        self._make_nodes()
        result.converge_s = self._wait(self.converged, self.converge_timeout, "joining")
        edges, ends = self._edges()
        result.connections = ends // 2
        if result.converge_s is None:
            result.errors.append(f"not converged within {self.converge_timeout:g} s")
            return
        self.progress(f"converged in {result.converge_s:.2f} s with {result.connections} "
                      "connections; waiting for heartbeat round trips")
        self._wait(lambda: all(p.rtt is not None for n in self.nodes for p in n.peers),
                   3 * self.heartbeat_interval + 5, "heartbeats")
        rtts = [p.rtt for n in self.nodes for p in n.peers if p.rtt is not None]
        result.rtt_samples = len(rtts)
        result.rtt_median_ms = statistics.median(rtts) * 1000 if rtts else None
        gauge = _greenlet_count()
        result.greenlets_per_connection = gauge / max(1, ends)
        result.rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self._exchange(result)

    def _exchange(self, result: SwarmResult) -> None:
        expected = 0
        for node in self.nodes:
            for peer in node.peers:
                for k in range(self.messages):
                    node.send(peer, KIND, {"from": node.id[:8], "n": k})
                    expected += 1
        result.expected = expected
        self.progress(f"sent {expected} messages, each node to each of its peers")
        if self._wait(lambda: self.deliveries >= expected, 30.0, "messages") is None:
            result.errors.append("deliveries missing after 30 s")
        result.deliveries = self.deliveries
        if self.broadcasts:
            self._broadcast(result)

    def _broadcast(self, result: SwarmResult) -> None:
        before = [(n.metrics["gossip.delivered"], n.metrics["gossip.duplicates"]) for n in self.nodes]
        for k in range(self.broadcasts):
            origin = self.random.choice(self.nodes)
            started = time.perf_counter()
            msg_id = origin.broadcast(GOSSIP_KIND, {"n": k})
            self._sent_at[msg_id] = started
            self._got.setdefault(msg_id, set())
        expected = self.broadcasts * self.n
        self.progress(f"sent {self.broadcasts} broadcasts from random nodes")

        def delivered() -> int:
            return sum(len(got) for got in self._got.values())

        if self._wait(lambda: delivered() >= expected, 30.0, "broadcasts") is None:
            result.errors.append(f"broadcast deliveries {delivered()}/{expected} after 30 s")
        copies = deliveries = 0
        for node, (d0, c0) in zip(self.nodes, before, strict=True):
            deliveries += node.metrics["gossip.delivered"] - d0
            copies += node.metrics["gossip.delivered"] - d0 + node.metrics["gossip.duplicates"] - c0
        result.broadcasts = self.broadcasts
        result.coverage = delivered() / expected
        if self.duplicate_deliveries:
            result.errors.append(f"{self.duplicate_deliveries} broadcasts delivered twice to a node")
        result.redundancy = copies / max(1, deliveries)
        result.hops_max = max(n._gossip.hops_max for n in self.nodes)
        latencies = sorted(self._latencies)
        if latencies:
            result.latency_p50_ms = latencies[len(latencies) // 2] * 1000
            result.latency_p99_ms = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000

    def stop(self) -> None:
        for node in self.nodes:
            node.stop(timeout=2.0)


def _greenlet_count() -> int:
    """Live greenlets that belong to connections: each Peer's reader, writer and heartbeat,
    and the listener's handler of each inbound connection."""
    return sum(1 for g in gc.get_objects()
               if isinstance(g, Greenlet) and not g.dead
               and (":peer:" in g.name or g.name.startswith("listener:")))
