"""Swarm: many nodes as greenlets in one process, and the figures that show them working.

Node *i* listens on its own address (127.x.y.z over TCP, 10.x.y.z on the in-memory network)
and dials from it. Every node but node 0 knows only node 0; discovery (getaddr/addr) does
the rest. The timeline of a run:

1. *Sizing.* Heartbeats are scaled to the number of connections (:func:`sizing`); over TCP
   the file-descriptor budget (:func:`fd_budget`) must fit the process limit, which is
   raised to it (:func:`ensure_fd_limit`), or the run is refused.
2. *Start.* All nodes start with their dials held at a gate; the RSS then is the baseline
   of ``rss_kb_per_connection``. t0 is when the gate opens, right after the last
   ``start()`` returned. Dials in flight are capped process-wide (``DIAL_CAP``).
3. *Converge.* Converged: every live node has ``min(outbound, live-1)`` ready outbound
   peers (or is already connected to every other live node) and the live graph is one
   component. ``converge_s`` is t0 to the first converged moment.
4. *Messages.* Every node sends ``messages`` messages to each of its peers; each must
   reach the remote handler.
5. *Broadcasts* go out from random live nodes at ``rate`` per second. With ``kill``, half
   of them are sent, then that fraction of the nodes (never node 0) is killed abruptly
   (sockets reset, nothing sent), ``heal_s`` is measured until every survivor has a ready
   peer and the survivors form one component, and the other half is sent.

The figures are in :class:`SwarmResult`; a view (plain lines or a rich live table) shows
progress on stderr.
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import random
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, TextIO

import gevent
from gevent.event import Event
from gevent.greenlet import Greenlet
from gevent.lock import BoundedSemaphore
from gevent.pool import Group, Pool

from gp2p import transport as tcp_transport
from gp2p.config import Config
from gp2p.errors import GP2PError
from gp2p.node import Node
from gp2p.tasks import TaskGroup

log = logging.getLogger(__name__)

__all__ = ["Swarm", "SwarmResult", "SwarmTooBig", "swarm_address", "connected_components",
           "sizing", "fd_budget", "ensure_fd_limit", "make_view"]

KIND = "swarm.msg"
GOSSIP_KIND = "swarm.gossip"
#: dials (TCP connects) in flight at once, over the whole process
DIAL_CAP = 200
#: address book entries per node: a swarm node needs a sample of the network, not all of it
BOOK_CAP = 1024
#: heartbeat round trips per second the process should stay under
HEARTBEAT_BUDGET = 2000
#: file descriptors the process needs besides the nodes' sockets
FD_RESERVE = 200
#: node 0's max_pending: all the others dial it at once
SEED_PENDING = 256
#: with ``defer_full_gc``, the cyclic collector's oldest generation is not collected during
#: the run: a full collection walks every object, and with the gigabytes of a 10,000-node
#: swarm each one stopped the whole process for seconds, more often as the heap grew (a
#: fifth of the joining time at 10,000 nodes). Reference counting still frees everything
#: acyclic, and the young generations are still collected; only garbage cycles that lived
#: long enough to reach the oldest generation wait until the run ends.
FULL_GC_THRESHOLD = 10 ** 9
#: each node's ``stop()`` bound: all stop at once, so a busy hub makes each one slow (10,000
#: nodes take over a minute), and a shorter bound only turns clean exits into killed
#: stragglers, a warning each; only a stuck node waits this long
STOP_TIMEOUT = 120.0
#: how long a phase waits for its deliveries *without any progress* (a big swarm floods
#: each broadcast as a million frames and takes minutes, and that is still not a failure),
#: and the kill phase for a heal
PHASE_TIMEOUT = 30.0
MEMORY_PORT = 7000


class SwarmTooBig(GP2PError):
    """The run does not fit this process (its message says why and what to do)."""


def swarm_address(index: int, transport: str = "tcp") -> str:
    """The listen address of node ``index``: 127.1.0.1, 127.2.0.1, ... 127.250.0.1,
    127.1.1.1, ... over TCP; 10.0.0.1:7000, 10.1.0.1:7000, ... in memory.

    Consecutive nodes are in different /16 network groups, as hosts of a real network
    would be: the address book bounds what one group can fill, so a swarm crammed into one
    /16 would have every node know the same few hundred addresses (the first joiners) and
    dial them all at once."""
    a, b, c = index % 250, (index // 250) % 250, 1 + index // 62500
    if transport == "memory":
        return f"10.{a}.{b}.{c}:{MEMORY_PORT}"
    return f"127.{a + 1}.{b}.{c}:0"


def sizing(nodes: int, outbound: int) -> tuple[float, float]:
    """Heartbeat interval and peer timeout for a run: 2 s / 5 s up to 200 nodes; above,
    the interval grows with the number of connections (about one second per 800) so the
    process stays near ``HEARTBEAT_BUDGET`` round trips/s, capped at 60 s so a dead peer is
    still noticed within 3 minutes; the timeout is three intervals."""
    if nodes <= 200:
        return 2.0, 5.0
    connections = nodes * min(outbound, nodes - 1)
    interval = float(min(60, max(2, math.ceil(connections / 800))))
    return interval, 3 * interval


def fd_budget(nodes: int, outbound: int, transport: str = "tcp", dial_cap: int = DIAL_CAP) -> int:
    """File descriptors a run needs: each node's listener and both ends of its outbound
    connections, both ends of every dial in flight, and a reserve. The in-memory network
    uses none for its connections."""
    if transport == "memory":
        return FD_RESERVE
    return nodes * (2 * outbound + 1) + 2 * dial_cap + SEED_PENDING + FD_RESERVE


def ensure_fd_limit(budget: int) -> int:
    """Raise the soft open-files limit to ``budget`` if needed (never above the hard limit);
    return the limit in force. Raises :class:`SwarmTooBig` when the budget does not fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if budget <= soft:
        return soft
    ceiling = hard if hard != resource.RLIM_INFINITY else budget
    if budget > ceiling:
        raise SwarmTooBig(
            f"this run needs about {budget} file descriptors but the process may open at most "
            f"{ceiling} (hard limit); use fewer --nodes or --outbound, or --transport memory, "
            "whose connections use no file descriptor")
    resource.setrlimit(resource.RLIMIT_NOFILE, (budget, hard))
    return budget


def connected_components(edges: dict[int, set[int]], members: list[int] | set[int]) -> int:
    """How many connected components ``members`` form under ``edges`` (pure); edges to
    non-members are ignored."""
    members = set(members)
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
                if other in members and other not in seen:
                    seen.add(other)
                    stack.append(other)
    return components


def current_rss() -> int:
    """Resident set size of this process now, in bytes (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))]


@dataclass
class SwarmResult:
    """What a run measured; ``None`` where it does not apply or was not reached."""

    nodes: int
    heartbeat_interval: float
    peer_timeout: float
    transport: str = "tcp"
    outbound: int = 8
    seed: int | None = None
    converge_s: float | None = None
    connections: int | None = None
    deliveries: int = 0
    expected: int = 0
    rtt_median_ms: float | None = None
    broadcasts: int = 0
    coverage: float | None = None
    redundancy: float | None = None
    hops_max: int | None = None
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    msgs_per_s: float | None = None
    rss_mb: float | None = None
    rss_kb_per_connection: float | None = None
    greenlets_per_connection: float | None = None
    killed: int | None = None
    heal_s: float | None = None
    coverage_after_kill: float | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.converge_s is not None and self.deliveries == self.expected
                and (not self.broadcasts or self.coverage == 1.0) and not self.errors)

    def summary(self) -> str:
        conv = f"{self.converge_s:.2f} s" if self.converge_s is not None else "NOT converged"
        rtt = f"{self.rtt_median_ms:.2f} ms" if self.rtt_median_ms is not None else "n/a"
        lines = [
            f"nodes {self.nodes} ({self.transport}), outbound {self.outbound}, connections "
            f"{self.connections}, heartbeat {self.heartbeat_interval:g} s / timeout "
            f"{self.peer_timeout:g} s, seed {self.seed}",
            f"converged in {conv}",
            f"messages delivered {self.deliveries}/{self.expected}, median RTT {rtt}",
        ]
        if self.broadcasts and self.coverage is not None:
            lines.append(f"broadcasts {self.broadcasts}: coverage {self.coverage:.4f}, redundancy "
                         f"{self.redundancy:.2f} copies per delivery, max hops {self.hops_max}, "
                         f"{self.msgs_per_s or 0:.0f} deliveries/s")
            if self.latency_p50_ms is not None:
                lines.append(f"broadcast latency p50 {self.latency_p50_ms:.1f} ms, "
                             f"p99 {self.latency_p99_ms:.1f} ms")
        if self.killed is not None:
            heal = f"{self.heal_s:.2f} s" if self.heal_s is not None else "NOT healed"
            after = f"{self.coverage_after_kill:.4f}" if self.coverage_after_kill is not None else "n/a"
            lines.append(f"killed {self.killed} nodes: healed in {heal}, coverage after the kill {after}")
        if self.rss_mb is not None:
            per = (f"{self.rss_kb_per_connection:.1f} KiB per connection end"
                   if self.rss_kb_per_connection is not None else "n/a per connection")
            greenlets = (f", {self.greenlets_per_connection:.2f} greenlets per connection end"
                         if self.greenlets_per_connection is not None else "")
            lines.append(f"peak RSS {self.rss_mb:.0f} MiB, {per}{greenlets}")
        lines.extend(f"error: {e}" for e in self.errors)
        lines.append("OK" if self.ok else "FAILED")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


# -- views -------------------------------------------------------------------------------


class PlainView:
    """Progress as plain lines on a stream, a status line at most every ``every`` seconds."""

    def __init__(self, stream: TextIO | None = None, every: float = 1.0):
        self.stream = stream
        self.every = every
        self._last = 0.0

    def log(self, line: str) -> None:
        if self.stream is not None:
            self.stream.write(line + "\n")
            self.stream.flush()

    def status(self, snap: dict[str, Any]) -> None:
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            self.log(format_status(snap))

    def close(self) -> None:
        pass


def format_status(snap: dict[str, Any]) -> str:
    return (f"[{snap['phase']:<10} {snap['elapsed']:6.1f}s] nodes up {snap['up']}/{snap['nodes']}, "
            f"connections {snap['connections']}, converged {snap['converged'] * 100:5.1f}%, "
            f"{snap['msgs_per_s']:.0f} msgs/s")


class RichView:
    """A rich ``Live`` table on stderr (needs the ``[cli]`` extra)."""

    def __init__(self, stream: TextIO):
        from rich.console import Console
        from rich.live import Live

        self._console = Console(file=stream)
        # refreshed by us, from the hub: rich's own refresh thread would race the updates
        self._live = Live(console=self._console, auto_refresh=False, transient=False)
        self._live.start()

    def log(self, line: str) -> None:
        self._live.console.print(line, markup=False, highlight=False)

    def status(self, snap: dict[str, Any]) -> None:
        from rich.table import Table

        table = Table(title=f"gp2p swarm — {snap['phase']}", show_header=True)
        for name in ("elapsed", "nodes up", "connections", "converged", "msgs/s"):
            table.add_column(name, justify="right")
        table.add_row(f"{snap['elapsed']:.1f} s", f"{snap['up']}/{snap['nodes']}", str(snap["connections"]),
                      f"{snap['converged'] * 100:.1f} %", f"{snap['msgs_per_s']:.0f}")
        self._live.update(table, refresh=True)

    def close(self) -> None:
        self._live.stop()


def make_view(stream: TextIO = sys.stderr, live: bool | None = None) -> PlainView | RichView:
    """A rich live view when ``stream`` is a terminal and rich is installed, else plain lines."""
    if live is None:
        live = hasattr(stream, "isatty") and stream.isatty()
    if live:
        try:
            return RichView(stream)
        except ImportError:
            pass
    return PlainView(stream)


# -- the transport every node of a swarm shares -----------------------------------------


class _GatedTransport:
    """Wraps a transport: dials wait for ``gate``, and at most ``cap`` dials (connect and
    handshake: see ``PeerManager.connect``) run at once in the process."""

    def __init__(self, base: Any, cap: int):
        self.base = base
        self.gate = Event()
        self._slots = BoundedSemaphore(cap)

    def listen(self, *args: Any, **kwargs: Any) -> Any:
        return self.base.listen(*args, **kwargs)

    def dial(self, address: str, timeout: float, source: str | None = None) -> Any:
        return self.base.dial(address, timeout, source)

    @contextlib.contextmanager
    def dial_slot(self) -> Iterator[None]:
        self.gate.wait()
        with self._slots:
            yield


# -- the swarm ---------------------------------------------------------------------------


class Swarm:
    """Runs ``n`` nodes in this process. ``run()`` returns a :class:`SwarmResult`.

    ``broadcasts`` go out at ``rate`` per second (0: all at once), each carrying
    ``payload_size`` bytes; with ``duration`` the broadcast phase lasts that long instead
    (``rate x duration`` broadcasts). ``kill`` is the fraction of nodes killed halfway
    through the broadcasts. Heartbeat settings default to :func:`sizing`. Extra keyword
    arguments are Config fields for every node.
    """

    def __init__(self, n: int = 20, outbound: int = 8, messages: int = 1, broadcasts: int = 10,
                 rate: float = 10.0, duration: float | None = None, payload_size: int = 64,
                 kill: float = 0.0, transport: str = "tcp", seed: int | None = None,
                 heartbeat_interval: float | None = None, peer_timeout: float | None = None,
                 converge_timeout: float = 120.0, view: Any = None, defer_full_gc: bool = False,
                 **config: Any):
        if n < 2:
            raise ValueError("a swarm needs at least 2 nodes")
        if transport not in ("tcp", "memory"):
            raise ValueError(f"transport must be 'tcp' or 'memory', not {transport!r}")
        if not 0.0 <= kill < 1.0:
            raise ValueError("kill is a fraction of the nodes: 0 <= kill < 1")
        if duration is not None:
            if rate <= 0:
                raise ValueError("--duration needs a --rate above 0")
            broadcasts = max(1, round(rate * duration))
        if kill and broadcasts < 2:
            raise ValueError("kill needs at least 2 broadcasts: half before, half after")
        self.n = n
        self.outbound = max(1, outbound)
        self.messages = messages
        self.broadcasts = broadcasts
        self.rate = rate
        self.payload = bytes(payload_size)
        self.kill_fraction = kill
        self.transport_name = transport
        self.seed = seed if seed is not None else random.randrange(2 ** 32)
        self.random = random.Random(self.seed)
        auto_hb, auto_timeout = sizing(n, self.outbound)
        self.heartbeat_interval = heartbeat_interval or auto_hb
        if peer_timeout is None:
            peer_timeout = auto_timeout if heartbeat_interval is None else max(5.0, 2.5 * self.heartbeat_interval)
        self.peer_timeout = peer_timeout
        self.converge_timeout = converge_timeout
        self.view = view if view is not None else PlainView(None)
        #: for a process that runs only this swarm (the CLI): see FULL_GC_THRESHOLD
        self.defer_full_gc = defer_full_gc
        self.config = config
        self.nodes: list[Node] = []
        self.live: set[int] = set()
        self.phase = "new"
        self._t0 = time.monotonic()
        self._index: dict[str, int] = {}
        self.deliveries = 0
        # broadcasts: id -> perf_counter() at the call, and the node indexes that delivered it
        self._sent_at: dict[str, float] = {}
        self._got: dict[str, set[int]] = {}
        self._latencies: list[float] = []
        self._hops_max = 0
        self._duplicates = 0
        self._last_delivery = 0.0
        self._rate_mark = (time.monotonic(), 0)
        self._transport: _GatedTransport | None = None

    # -- setup -------------------------------------------------------------------------

    def budget(self) -> int:
        return fd_budget(self.n, self.outbound, self.transport_name)

    def _make_transport(self) -> _GatedTransport:
        if self.transport_name == "memory":
            from gp2p.memnet import MemoryNetwork

            base: Any = MemoryNetwork(seed=self.seed)
        else:
            base = tcp_transport
        return _GatedTransport(base, DIAL_CAP)

    def _make_nodes(self) -> None:
        for i in range(self.n):
            bootstrap = [self.nodes[0].address] if i else []
            fields = dict(listen=swarm_address(i, self.transport_name), bootstrap=bootstrap,
                          target_outbound=self.outbound, heartbeat_interval=self.heartbeat_interval,
                          peer_timeout=self.peer_timeout, max_addresses=BOOK_CAP, network_id="gp2p-swarm")
            if i == 0:  # every other node joins through it, at once: a seed's handshake queue
                fields["max_pending"] = SEED_PENDING
            fields.update(self.config)
            node = Node(config=Config(**fields), transport=self._transport)
            node.on(KIND)(self._delivered)
            node.on(GOSSIP_KIND, context=True)(self._gossip_handler(i))
            node.start()
            self.nodes.append(node)
            self._index[node.id] = i
            self.live.add(i)

    def _delivered(self, peer: Any, payload: Any) -> None:
        self.deliveries += 1

    def _gossip_handler(self, index: int) -> Callable[[Any, Any, Any], None]:
        def handler(peer: Any, payload: Any, ctx: Any) -> None:
            now = time.perf_counter()
            got = self._got.setdefault(ctx.msg_id, set())
            if index in got:
                self._duplicates += 1
                return
            got.add(index)
            self._last_delivery = now
            self._hops_max = max(self._hops_max, ctx.hops)
            if peer is not None:
                sent = self._sent_at.get(ctx.msg_id)
                if sent is not None:
                    self._latencies.append(now - sent)
        return handler

    # -- observation -------------------------------------------------------------------

    def _edges(self) -> tuple[dict[int, set[int]], int]:
        """Ready links between live nodes, and how many connection ends that is."""
        index = self._index
        edges: dict[int, set[int]] = {}
        ends = 0
        for i in self.live:
            for peer in self.nodes[i].peers:
                j = index.get(peer.id)
                if j is not None and j in self.live:
                    ends += 1
                    edges.setdefault(i, set()).add(j)
        return edges, ends

    def _satisfied(self, i: int) -> bool:
        peers = self.nodes[i].peers
        want = min(self.outbound, len(self.live) - 1)
        return (sum(1 for p in peers if p.direction == "outbound") >= want
                or len(peers) >= len(self.live) - 1)

    def converged(self) -> bool:
        """Every live node has ``min(outbound, live-1)`` ready outbound peers (or is already
        connected to every other live node), and the live graph is one component."""
        if not all(self._satisfied(i) for i in self.live):
            return False
        edges, _ = self._edges()
        return connected_components(edges, self.live) == 1

    def healed(self) -> bool:
        """Every live node has a ready peer that is live, and the live nodes form one component."""
        edges, _ = self._edges()
        if any(not edges.get(i) for i in self.live):
            return False
        return connected_components(edges, self.live) == 1

    def snapshot(self) -> dict[str, Any]:
        """What the live view shows."""
        _, ends = self._edges()
        now = time.monotonic()
        mark_time, mark_count = self._rate_mark
        count = self.deliveries + sum(len(g) for g in self._got.values())
        rate = (count - mark_count) / (now - mark_time) if now > mark_time else 0.0
        self._rate_mark = (now, count)
        satisfied = sum(1 for i in self.live if self._satisfied(i))
        return {"phase": self.phase, "elapsed": now - self._t0, "nodes": self.n,
                "up": sum(1 for i in self.live if self.nodes[i].started), "connections": ends // 2,
                "converged": satisfied / max(1, len(self.live)), "msgs_per_s": rate}

    def _monitor(self) -> None:
        # a snapshot walks every connection: spaced to cost at most a twentieth of the time
        pause = 1.0
        while True:
            gevent.sleep(pause)
            if self.nodes:
                before = time.perf_counter()
                self.view.status(self.snapshot())
                pause = max(1.0, 20 * (time.perf_counter() - before))

    def _wait(self, predicate: Callable[[], bool], timeout: float) -> float | None:
        """Seconds until ``predicate()`` holds, or None after ``timeout``. Checks are spaced
        to cost at most a tenth of the time, so a big swarm is not slowed by watching it."""
        start = time.monotonic()
        while True:
            before = time.monotonic()
            if predicate():
                return before - start
            cost = time.monotonic() - before
            if before - start > timeout:
                return None
            gevent.sleep(max(0.02, 10 * cost))

    def _wait_deliveries(self, delivered: Callable[[], int], expected: int) -> bool:
        """Wait until ``delivered()`` reaches ``expected``; False once it has not grown for
        PHASE_TIMEOUT seconds."""
        last = [delivered(), time.monotonic()]

        def done_or_stalled() -> bool:
            count = delivered()
            if count >= expected:
                return True
            if count > last[0]:
                last[:] = [count, time.monotonic()]
            return time.monotonic() - last[1] > PHASE_TIMEOUT

        self._wait(done_or_stalled, float("inf"))
        return delivered() >= expected

    # -- the run -----------------------------------------------------------------------

    def run(self) -> SwarmResult:
        result = SwarmResult(nodes=self.n, heartbeat_interval=self.heartbeat_interval,
                             peer_timeout=self.peer_timeout, transport=self.transport_name,
                             outbound=self.outbound, seed=self.seed)
        ensure_fd_limit(self.budget())
        tasks = TaskGroup("swarm")
        tasks.spawn("monitor", self._monitor)
        thresholds = gc.get_threshold()
        if self.defer_full_gc:
            gc.set_threshold(thresholds[0], thresholds[1], FULL_GC_THRESHOLD)
        try:
            self._run(result)
        finally:
            tasks.kill(timeout=10.0, quiet=True)  # a busy hub runs a kill late
            self.phase = "stopping"
            self.stop()
            self.view.close()
            gc.set_threshold(*thresholds)
        result.rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return result

    def _run(self, result: SwarmResult) -> None:
        self._transport = self._make_transport()
        where = "10.x.y.z (in memory)" if self.transport_name == "memory" else "127.x.y.z (TCP)"
        self.view.log(f"starting {self.n} nodes on {where}; each knows only node 0 and keeps "
                      f"{min(self.outbound, self.n - 1)} outbound connections; heartbeat "
                      f"{self.heartbeat_interval:g} s, peer timeout {self.peer_timeout:g} s, seed {self.seed}")
        self.phase = "starting"
        self._make_nodes()
        gc.collect()
        rss_started = current_rss()
        self.phase = "joining"
        self._t0 = time.monotonic()
        self._transport.gate.set()
        result.converge_s = self._wait(self.converged, self.converge_timeout)
        edges, ends = self._edges()
        result.connections = ends // 2
        if result.converge_s is None:
            result.errors.append(f"not converged within {self.converge_timeout:g} s")
            return
        gc.collect()
        if result.connections:
            result.rss_kb_per_connection = (current_rss() - rss_started) / (2 * result.connections) / 1024
        result.greenlets_per_connection = _greenlet_count() / max(1, ends)
        self.view.log(f"converged in {result.converge_s:.2f} s with {result.connections} connections")
        result.rtt_median_ms = self._sample_rtt()
        self._exchange(result)
        if self.broadcasts:
            self._broadcast_phases(result)

    def _sample_rtt(self, samples: int = 200) -> float | None:
        """Median of ``Peer.ping`` over a random sample of connections."""
        peers = [p for i in sorted(self.live) for p in self.nodes[i].peers]
        chosen = self.random.sample(peers, min(samples, len(peers)))
        rtts: list[float] = []

        def ping(peer: Any) -> None:
            try:
                rtts.append(peer.ping(timeout=self.peer_timeout))
            except GP2PError:
                pass

        Pool(50).map(ping, chosen)
        return statistics.median(rtts) * 1000 if rtts else None

    def _exchange(self, result: SwarmResult) -> None:
        if not self.messages:
            return
        self.phase = "messages"
        expected = 0
        for i in sorted(self.live):
            node = self.nodes[i]
            for peer in node.peers:
                for k in range(self.messages):
                    node.send(peer, KIND, {"n": k})
                    expected += 1
        result.expected = expected
        if not self._wait_deliveries(lambda: self.deliveries, expected):
            result.errors.append(f"messages delivered {self.deliveries}/{expected}, none more in {PHASE_TIMEOUT:g} s")
        result.deliveries = self.deliveries
        self.view.log(f"messages: {result.deliveries}/{expected} delivered, each node to each of its peers")

    def _send_broadcasts(self, count: int) -> tuple[list[str], int]:
        """Send ``count`` broadcasts from random live nodes at ``rate``; return their ids
        and the deliveries they should make (the live nodes at each send)."""
        ids: list[str] = []
        expected = 0
        start = time.monotonic()
        for k in range(count):
            origin = self.nodes[self.random.choice(sorted(self.live))]
            sent = time.perf_counter()
            msg_id = origin.broadcast(GOSSIP_KIND, {"n": k, "data": self.payload})
            self._sent_at[msg_id] = sent
            self._got.setdefault(msg_id, set())
            ids.append(msg_id)
            expected += len(self.live)
            if self.rate > 0:
                gevent.sleep(max(0.0, start + (k + 1) / self.rate - time.monotonic()))
        return ids, expected

    def _broadcast_batch(self, count: int) -> tuple[int, int, float]:
        """Send a batch and wait for it: (deliveries, expected, seconds from first send to
        last delivery)."""
        started = time.perf_counter()
        ids, expected = self._send_broadcasts(count)

        def delivered() -> int:
            return sum(len(self._got[i]) for i in ids)

        if not self._wait_deliveries(delivered, expected):
            self.view.log(f"broadcasts: {delivered()}/{expected} deliveries, none more in {PHASE_TIMEOUT:g} s")
        return delivered(), expected, max(1e-6, self._last_delivery - started)

    def _broadcast_phases(self, result: SwarmResult) -> None:
        before = [(n.metrics["gossip.delivered"], n.metrics["gossip.duplicates"]) for n in self.nodes]
        self.phase = "broadcasts"
        first = self.broadcasts - self.broadcasts // 2 if self.kill_fraction else self.broadcasts
        got, expected, seconds = self._broadcast_batch(first)
        if self.kill_fraction:
            self._kill(result)
            self.phase = "after kill"
            got2, expected2, seconds2 = self._broadcast_batch(self.broadcasts - first)
            result.coverage_after_kill = got2 / max(1, expected2)
            got, expected, seconds = got + got2, expected + expected2, seconds + seconds2
        result.broadcasts = self.broadcasts
        result.coverage = got / max(1, expected)
        result.msgs_per_s = got / seconds
        copies = deliveries = 0
        for node, (d0, c0) in zip(self.nodes, before, strict=True):
            deliveries += node.metrics["gossip.delivered"] - d0
            copies += node.metrics["gossip.delivered"] - d0 + node.metrics["gossip.duplicates"] - c0
        result.redundancy = copies / max(1, deliveries)
        result.hops_max = self._hops_max
        if self._duplicates:
            result.errors.append(f"{self._duplicates} broadcasts delivered twice to a node")
        latencies = sorted(self._latencies)
        if latencies:
            result.latency_p50_ms = _percentile(latencies, 0.5) * 1000
            result.latency_p99_ms = _percentile(latencies, 0.99) * 1000
        self.view.log(f"broadcasts: {got}/{expected} deliveries")

    def _kill(self, result: SwarmResult) -> None:
        self.phase = "kill"
        count = min(self.n - 1, round(self.kill_fraction * self.n))
        victims = self.random.sample(range(1, self.n), count)
        killed_at = time.monotonic()
        dying = []
        for i in victims:
            self.live.discard(i)
            dying += self.nodes[i].kill(block=False)
        gevent.joinall(dying, timeout=5.0)
        result.killed = count
        self.view.log(f"killed {count} nodes abruptly; waiting for the survivors to heal")
        self.phase = "healing"
        killing = time.monotonic() - killed_at
        healed = self._wait(self.healed, PHASE_TIMEOUT)
        result.heal_s = None if healed is None else killing + healed
        if result.heal_s is None:
            result.errors.append(f"survivors not healed within {PHASE_TIMEOUT:g} s of the kill")
        else:
            self.view.log(f"healed {result.heal_s:.2f} s after the kill")

    def stop(self) -> None:
        """Stop every node, all at once: each ``stop()`` closes its listener and dialer and
        says goodbye to its peers before it first waits, so in one pass of the hub the whole
        swarm stops dialling. Stopped a few hundred at a time, the nodes still running
        redialled every peer they lost, and 10,000 nodes took many minutes to stop."""
        if self._transport is not None:
            self._transport.gate.set()  # dials still held would block their node's stop
        group = Group()
        for node in self.nodes:
            group.spawn(node.stop, timeout=STOP_TIMEOUT)
        group.join(raise_error=True)


def _greenlet_count() -> int:
    """Live greenlets that belong to connections: each Peer's reader, writer and heartbeat,
    and the listener's handler of each inbound connection."""
    return sum(1 for g in gc.get_objects()
               if isinstance(g, Greenlet) and not g.dead
               and (":peer:" in g.name or g.name.startswith("listener:")))
