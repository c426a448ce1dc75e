"""An in-memory network: a transport with the interface of :mod:`gp2p.transport`, no sockets.

``Node(..., transport=MemoryNetwork())`` runs a node over it unchanged, so thousands of nodes
fit in one process without file descriptors. The model, and where it differs from TCP:

- **Addresses** are opaque ``ip:port`` strings (any IPv4 text, e.g. ``10.0.0.1:7000``); a
  port is bound per IP. A dial without ``source`` gets a fresh IP of ``172.16.0.0/12`` so
  ``remote_ip`` still tells dialers apart. Client ports are ephemeral and unique per IP.
  ``0.0.0.0`` listens on every IP for its port. No IPv6 semantics, no TIME_WAIT.
- **Streams** are two ends with one receive buffer each (:data:`RECV_BUFFER` bytes):
  ``sendall`` copies what fits and blocks cooperatively for the rest while the reader's
  unread bytes are at the limit, so a slow reader back-pressures its writer as with TCP
  (there is no separate send buffer, hence less slack than a real socket pair).
- **Latency** is per link (a pair of IPs, symmetric): each chunk is stamped with the time it
  is due and the reader waits for the head chunk; chunks stay in order. A dial costs one
  round trip. There is no bandwidth limit, jitter or Nagle: only delay.
- **Close** is a FIN, queued behind the data: the other end reads the data, then 0. Its
  first ``sendall`` afterwards is dropped, later ones raise ``BrokenPipeError`` (the
  remote "answered with a reset"). **Abort** is an RST and is not delayed by latency: the
  other end may still read what had already arrived, then every ``recv_into`` and
  ``sendall`` raises ``ConnectionResetError``. Using a locally closed end raises
  ``OSError(EBADF)``, as a closed socket does. Closing with unread data is still a FIN.
- **Loss** on a stream means a reset: with ``reset_probability`` p, each ``sendall`` resets
  its connection with probability p (both ends see ``ConnectionResetError``).
- **Partitions** silence links between two groups of IPs: nothing is reset, bytes (and FINs)
  sent or still in flight are held, dials block and time out. :meth:`MemoryNetwork.heal`
  delivers what was held, in order, as TCP retransmission would, and resets that happened
  meanwhile. Held bytes count against the receive buffer, so writers block as with TCP.
  No keepalive or retransmission timeout ever ends a connection on its own.
- **Listeners** run ``handler(stream)`` in a greenlet of their own ``Pool(pool_size)``,
  named ``listener:<address>:conn``; while the pool is full a dial waits (a backlog) up to
  its timeout. Closing a listener refuses later dials; dials already waiting time out.

Everything uses gevent primitives only, so it works with or without monkey-patching; it
spawns no greenlet of its own (handlers excepted) and no timer per chunk.
"""
from __future__ import annotations

import errno
import ipaddress
import logging
import random
import time
from typing import Callable, Iterable

import gevent
from gevent.event import Event
from gevent.greenlet import Greenlet
from gevent.pool import Pool

from gp2p.config import format_address, parse_address, parse_listen
from gp2p.memstream import RECV_BUFFER, Link, MemoryStream, wake

log = logging.getLogger(__name__)
_now = time.monotonic

__all__ = ["MemoryNetwork", "MemoryStream", "MemoryListener", "RECV_BUFFER"]

EPHEMERAL_PORTS = (32768, 60999)
CLIENT_BASE = int(ipaddress.IPv4Address("172.16.0.1"))
CLIENT_COUNT = 2**20 - 2


class MemoryListener:
    """A listening address of a :class:`MemoryNetwork`; ``address`` is ``ip:port``."""

    def __init__(self, net: "MemoryNetwork", ip: str, port: int, handler: Callable[[MemoryStream], None],
                 pool_size: int, on_error: Callable[[BaseException], None] | None):
        self.ip = ip
        self.port = port
        self.address = format_address(ip, port)
        self.pool = Pool(pool_size)
        self.closed = False
        self._net = net
        self._handler = handler
        self._on_error = on_error

    def __repr__(self) -> str:
        return f"<MemoryListener {self.address}{' closed' if self.closed else ''}>"

    def _spawn(self, stream: MemoryStream) -> None:
        greenlet = Greenlet(self._serve, stream)
        greenlet.name = f"listener:{self.address}:conn"
        self.pool.start(greenlet)

    def _serve(self, stream: MemoryStream) -> None:
        try:
            self._handler(stream)
        except gevent.GreenletExit:
            raise
        except Exception as exc:
            log.exception("inbound handler on %s failed", self.address)
            if self._on_error is not None:
                self._on_error(exc)
        finally:
            stream.close()

    def close(self) -> None:
        """Stop accepting (later dials are refused); accepted streams are left to their owners."""
        if not self.closed:
            self.closed = True
            self._net._unlisten(self)

    def stop(self, timeout: float = 1.0) -> None:
        """Stop accepting and kill handlers still running after ``timeout``."""
        self.close()
        self.pool.join(timeout=timeout)
        self.pool.kill(block=True, timeout=1)

    def abort(self) -> list:
        """Stop accepting and tell every handler to die, without waiting; return the
        handlers (to join)."""
        self.close()
        handlers = list(self.pool)
        gevent.killall(handlers, block=False)
        return handlers


class MemoryNetwork:
    """Listeners and connections between in-memory addresses; pass it as a Node's transport.

    :param latency: one-way delay in seconds of every link without its own
        (:meth:`set_latency`).
    :param reset_probability: probability that a ``sendall`` resets its connection.
    :param seed: seeds the random source of resets (reproducible runs).
    """

    def __init__(self, latency: float = 0.0, reset_probability: float = 0.0, seed: int | None = None):
        if latency < 0 or not 0.0 <= reset_probability <= 1.0:
            raise ValueError("latency must be >= 0 and reset_probability within [0, 1]")
        self.latency = latency
        self.reset_probability = reset_probability
        self.bytes_delivered = 0
        self.resets = 0
        self._random = random.Random(seed)
        self._listeners: dict[tuple[str, int], MemoryListener] = {}
        self._ports: dict[str, set[int]] = {}
        self._next_port = EPHEMERAL_PORTS[0]
        self._next_client = 0
        self._links: dict[tuple[str, str], Link] = {}
        self._latencies: dict[tuple[str, str], float] = {}
        self._partitions: list[tuple[frozenset[str], frozenset[str]]] = []
        self._stalled: set[MemoryStream] = set()  # readers waiting for a partition to heal
        self._held_resets: list[MemoryStream] = []
        self._healed = Event()
        self._streams = 0

    def __repr__(self) -> str:
        return (f"<MemoryNetwork {len(self._listeners)} listeners {self._streams} streams "
                f"{len(self._partitions)} partitions>")

    # -- the transport interface ---------------------------------------------------------

    def listen(self, spec: str, handler: Callable[[MemoryStream], None], pool_size: int,
               on_error: Callable[[BaseException], None] | None = None) -> MemoryListener:
        """Listen on the first free port of ``spec`` (as :func:`gp2p.transport.listen`)."""
        ip, ports = parse_listen(spec)
        used = self._ports.setdefault(ip, set())
        for port in ports:
            if port == 0:
                port = self._ephemeral(used)
            if port not in used and (ip, port) not in self._listeners:
                break
        else:
            if not used:
                del self._ports[ip]
            raise OSError(errno.EADDRINUSE, f"no free port in {spec!r}")
        used.add(port)
        listener = MemoryListener(self, ip, port, handler, pool_size, on_error)
        self._listeners[(ip, port)] = listener
        return listener

    def dial(self, address: str, timeout: float, source: str | None = None) -> MemoryStream:
        """Connect to ``address`` from the IP ``source`` (a fresh client IP if None).

        Raises ``ConnectionRefusedError`` when nobody listens there, and ``TimeoutError``
        after ``timeout`` across a partition or while the listener's pool stays full.
        """
        ip, port = parse_address(address)
        if source is None:
            source = self._client_ip()
        deadline = _now() + timeout
        while self._partitioned(source, ip):
            if not self._healed.wait(deadline - _now()):
                raise TimeoutError("timed out")
        latency = self._latency(source, ip)
        if latency:
            if _now() + 2 * latency > deadline:
                gevent.sleep(max(0.0, deadline - _now()))
                raise TimeoutError("timed out")
            gevent.sleep(2 * latency)  # SYN, SYN-ACK
        listener = self._listeners.get((ip, port)) or self._listeners.get(("0.0.0.0", port))
        if listener is None:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
        while listener.pool.full():
            if not listener.pool.wait_available(max(0.0, deadline - _now())):
                raise TimeoutError("timed out")
        if listener.closed:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
        used = self._ports.setdefault(source, set())
        local_port = self._ephemeral(used)
        used.add(local_port)
        link = self._link(source, ip)
        client = MemoryStream(self, link, (source, local_port), (ip, port), owns_port=True)
        server = MemoryStream(self, link, (ip, port), (source, local_port), owns_port=False)
        client._peer, server._peer = server, client
        link.refs += 1
        self._streams += 2
        listener._spawn(server)
        return client

    # -- faults --------------------------------------------------------------------------

    def set_latency(self, ip_a: str, ip_b: str, seconds: float) -> None:
        """One-way delay between two IPs, both ways, for existing and new connections."""
        if seconds < 0:
            raise ValueError("latency must be >= 0")
        key = _key(ip_a, ip_b)
        self._latencies[key] = seconds
        link = self._links.get(key)
        if link is not None:
            link.latency = seconds

    def partition(self, ips_a: Iterable[str], ips_b: Iterable[str]) -> None:
        """Silence every link between the two groups until :meth:`heal`."""
        group_a, group_b = frozenset(ips_a), frozenset(ips_b)
        self._partitions.append((group_a, group_b))
        now = _now()
        for (x, y), link in self._links.items():
            if link.since is None and self._partitioned(x, y):
                link.since = now

    def heal(self) -> None:
        """End every partition: held bytes, FINs and resets are delivered now."""
        self._partitions.clear()
        for link in self._links.values():
            link.since = None
        stalled, self._stalled = self._stalled, set()
        for stream in stalled:
            reader, stream._rwaiter = stream._rwaiter, None
            wake(reader)
        held, self._held_resets = self._held_resets, []
        for stream in held:
            self._reset(stream)
        self._healed.set()
        self._healed = Event()

    def stats(self) -> dict[str, int]:
        """Counters: listeners, open stream ends, bytes read by receivers, resets, links."""
        return {"listeners": len(self._listeners), "streams": self._streams,
                "bytes_delivered": self.bytes_delivered, "resets": self.resets,
                "links": len(self._links), "partitions": len(self._partitions)}

    # -- internals -------------------------------------------------------------------------

    def _reset(self, stream: MemoryStream) -> None:
        """An RST reaches ``stream`` (held while its link is partitioned)."""
        if stream._closed or stream._error == errno.ECONNRESET:
            return
        if stream._link.since is not None:
            self._held_resets.append(stream)
            return
        stream._error = errno.ECONNRESET
        stream._wake_all()

    def _partitioned(self, x: str, y: str) -> bool:
        for a, b in self._partitions:
            if (x in a and y in b) or (x in b and y in a):
                return True
        return False

    def _latency(self, x: str, y: str) -> float:
        return self._latencies.get(_key(x, y), self.latency)

    def _link(self, x: str, y: str) -> Link:
        key = _key(x, y)
        link = self._links.get(key)
        if link is None:
            link = Link(self._latencies.get(key), _now() if self._partitioned(x, y) else None)
            self._links[key] = link
        return link

    def _ephemeral(self, used: set[int]) -> int:
        low, high = EPHEMERAL_PORTS
        for _ in range(high - low + 1):
            port = self._next_port
            self._next_port = low if port >= high else port + 1
            if port not in used:
                return port
        raise OSError(errno.EADDRNOTAVAIL, "no free ephemeral port")

    def _client_ip(self) -> str:
        n = self._next_client
        self._next_client = (n + 1) % CLIENT_COUNT
        return str(ipaddress.IPv4Address(CLIENT_BASE + n))

    def _free_port(self, ip: str, port: int) -> None:
        used = self._ports.get(ip)
        if used is not None:
            used.discard(port)
            if not used:
                del self._ports[ip]

    def _end_closed(self, stream: MemoryStream) -> None:
        self._streams -= 1
        if stream._owns_port:
            self._free_port(stream.local_ip, stream.local_port)
        if stream._peer._closed:
            link = stream._link
            link.refs -= 1
            if not link.refs:
                self._links.pop(_key(stream.local_ip, stream.remote_ip), None)

    def _unlisten(self, listener: MemoryListener) -> None:
        if self._listeners.get((listener.ip, listener.port)) is listener:
            del self._listeners[(listener.ip, listener.port)]
            self._free_port(listener.ip, listener.port)


def _key(x: str, y: str) -> tuple[str, str]:
    return (x, y) if x <= y else (y, x)
