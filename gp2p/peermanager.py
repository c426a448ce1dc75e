"""PeerManager: admits inbound sockets, dials outbound ones, and keeps one Peer per node id.

- Inbound: a socket is *pending* from accept to the end of its handshake, bounded by
  ``max_pending`` (the extra ones are closed at accept) and, per remote IP, by
  ``max_per_ip``. The handshake runs under ``handshake_timeout`` counted from accept.
  ``max_inbound`` is checked after the handshake (``TOO_MANY_PEERS``).
- Duplicates: the app sees at most one ready Peer per node id. Of two connections between
  the same nodes, the one dialled by the smaller node id survives; the other is closed with
  DUPLICATE without any event. When the remote closes our registered connection as a
  duplicate, ``peer_disconnected`` waits a short grace for the connection it kept, so that
  the swap stays invisible.
- Full inbound slots: a newcomer evicts an unprotected inbound peer (see
  :mod:`gp2p.eviction`) or, when all are protected, is refused with TOO_MANY_PEERS.
- Bans: a banned or discouraged source is refused at accept, before its handshake, and
  never dialled. A protocol violation discourages the violator's IP for
  ``discourage_time``.
- Every dial goes through :meth:`PeerManager.connect`, which keeps the address book
  informed (attempt, success -> *tried*, failure -> backoff). The loops that decide whom to
  dial are in :mod:`gp2p.dialer`.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from typing import Any, Callable

import gevent
from gevent.event import Event

from gp2p import handshake
from gp2p import transport as tcp_transport
from gp2p.addressbook import AddressBook
from gp2p.bans import BanList
from gp2p.config import Config, parse_address
from gp2p.errors import DisconnectReason, HandshakeError, HandshakeTimeout, PeerGone, ProtocolError
from gp2p.eviction import Candidate, choose_eviction
from gp2p.identity import short_id
from gp2p.netgroup import network_group
from gp2p.peer import Peer
from gp2p.tasks import GroupClosed, TaskGroup

log = logging.getLogger(__name__)

__all__ = ["PeerManager"]

#: how long a duplicate swap may take before the app is told the peer left
SWAP_GRACE = 2.0
#: reasons that mean the remote broke the rules (when we, not they, closed for it)
VIOLATIONS = frozenset((DisconnectReason.PROTOCOL_ERROR, DisconnectReason.FRAME_TOO_LARGE,
                        DisconnectReason.BAD_SIGNATURE, DisconnectReason.MISBEHAVIOUR))


class PeerManager:
    """Connections of one node: admission, duplicates, dialling and redialling."""

    def __init__(self, config: Config, local: handshake.Local, tasks: TaskGroup, metrics: Any, *,
                 route: Callable[[Peer, str, dict], None], attach: Callable[[Peer], None],
                 connected: Callable[[Peer], None],
                 disconnected: Callable[[Peer, DisconnectReason], None],
                 ready: Callable[[Peer], None] | None = None,
                 closed: Callable[[Peer, DisconnectReason], None] | None = None,
                 book: AddressBook | None = None, bans: BanList | None = None,
                 evicting: Callable[[Peer], None] | None = None,
                 on_error: Callable | None = None, transport: Any = tcp_transport):
        self.config = config
        self.transport = transport
        self.local = local
        self.tasks = tasks
        self.metrics = metrics
        self._route = route
        self._attach = attach
        self._connected = connected
        self._disconnected = disconnected
        self._closed = closed
        self._ready = ready
        self._evicting = evicting
        self.book = book if book is not None else AddressBook()
        self.bans = bans if bans is not None else BanList()
        self._on_error = on_error
        self.by_id: dict[str, Peer] = {}
        self.connections: set[Peer] = set()
        #: peers closed (no longer in ``connections``) whose socket is not closed yet
        self.lingering: set[Peer] = set()
        #: addresses that turned out to be ourselves: never dialled again
        self.own_addresses: set[str] = set()
        self.pending = 0
        self._per_ip: Counter[str] = Counter()
        self._deferred: dict[str, Any] = {}
        self._changed = Event()
        self.closing = False
        self._stop = Event()

    def __repr__(self) -> str:
        return f"<PeerManager {len(self.by_id)} peers {self.pending} pending>"

    # -- registry ----------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = Event()

    def wait_change(self, timeout: float | None) -> None:
        """Block until the set of ready peers changes, or ``timeout``."""
        self._changed.wait(timeout)

    @staticmethod
    def _survivor(a: Peer, b: Peer) -> Peer:
        """Of two connections to one node id, the one to keep (dialled by the smaller id)."""
        if a.dialer_id == b.dialer_id:
            return a
        return a if a.dialer_id < b.dialer_id else b

    def _admission(self, info: handshake.PeerInfo) -> DisconnectReason | None:
        existing = self.by_id.get(info.id)
        if existing is not None and info.direction == "inbound" and existing.dialer_id <= info.id:
            return DisconnectReason.DUPLICATE  # the one we have wins (see _survivor)
        # an inbound newcomer that replaces an outbound duplicate takes an inbound slot too
        if info.direction == "inbound" and (existing is None or existing.direction == "outbound"):
            inbound = [p for p in self.by_id.values() if p.direction == "inbound"]
            if len(inbound) >= self.config.max_inbound and not self._evict(inbound):
                return DisconnectReason.TOO_MANY_PEERS
        return None

    def _evict(self, inbound: list[Peer]) -> bool:
        """Close one unprotected inbound peer to make room; False if all are protected."""
        candidates = [Candidate(p, p.connected_at, p.rtt, p.last_useful, network_group(p.remote_ip))
                      for p in inbound]
        victim = choose_eviction(candidates)
        if victim is None:
            return False
        self.metrics.inc("evicted")
        if self._evicting is not None:
            self._evicting(victim)  # e.g. addresses to go to instead: they leave before the disconnect
        victim.close(DisconnectReason.EVICTED, "inbound slots full")
        return True

    def _make_peer(self, info: handshake.PeerInfo, stream: Any, reader: Any) -> Peer:
        peer = Peer(info=info, stream=stream, reader=reader, local=self.local, config=self.config,
                    route=self._route, on_close=self._peer_closed, metrics=self.metrics,
                    owner=self.tasks.name, on_error=self._on_error)
        self._attach(peer)
        return peer

    def _register(self, peer: Peer) -> bool:
        """Make ``peer`` the node's Peer for its id; False if it lost to an existing one."""
        self.connections.add(peer)
        existing = self.by_id.get(peer.id)
        if existing is not None:
            if self._survivor(existing, peer) is existing:
                peer.close(DisconnectReason.DUPLICATE, "already connected")
                return False
            self.by_id[peer.id] = peer
            existing.close(DisconnectReason.DUPLICATE, "replaced by a connection dialled by the smaller id")
            log.debug("swapped %r for %r", existing, peer)
            return True
        self.by_id[peer.id] = peer
        deferred = self._deferred.pop(peer.id, None)
        if deferred is not None:
            deferred.kill(block=False)
            log.debug("swap completed silently for %r", peer)
        else:
            log.info("peer connected: %r", peer)
            self._connected(peer)
        self._notify()
        if self._ready is not None:
            self._ready(peer)
        return True

    def _peer_closed(self, peer: Peer, reason: DisconnectReason) -> None:
        self.connections.discard(peer)
        if not peer.socket_closed:
            # still flushing and lingering: the node's stop waits for it too (this must
            # not yield: admission counts peers while it evicts)
            self.lingering.add(peer)
            peer.when_socket_closed(lambda: self.lingering.discard(peer))
        if self._closed is not None:
            self._closed(peer, reason)
        self.metrics.inc(f"disconnects.{reason.name}")
        if reason in VIOLATIONS and not peer.closed_by_remote:
            self.discourage(peer.remote_ip, reason)
        if reason == DisconnectReason.EVICTED and peer.closed_by_remote and peer.dialed_address:
            # a full node: go elsewhere for a while, or the nodes that know it evict each
            # other from it as fast as they can redial it (a swarm's seed, typically)
            self.book.evicted(peer.dialed_address, time.time())
        if self.by_id.get(peer.id) is not peer:
            return  # a losing duplicate: the app never saw it
        del self.by_id[peer.id]
        self._notify()
        if reason == DisconnectReason.DUPLICATE and not self.closing:
            try:
                self._deferred[peer.id] = self.tasks.spawn_later(
                    SWAP_GRACE, f"swap:{short_id(peer.id)}", self._swap_expired, peer, reason)
                return
            except GroupClosed:
                pass
        log.info("peer disconnected: %r %s", peer, reason.name)
        self._disconnected(peer, reason)

    def discourage(self, ip: str, reason: DisconnectReason) -> None:
        """Refuse ``ip`` for ``discourage_time`` after it broke the protocol."""
        self.metrics.inc("discouraged")
        log.info("discouraging %s for %gs after %s", ip, self.config.discourage_time, reason.name)
        self.bans.discourage(ip, self.config.discourage_time, time.time())

    def is_banned(self, host: str) -> bool:
        return self.bans.is_banned(host, time.time())

    def _swap_expired(self, peer: Peer, reason: DisconnectReason) -> None:
        self._deferred.pop(peer.id, None)
        log.info("peer disconnected: %r %s", peer, reason.name)
        self._disconnected(peer, reason)

    # -- inbound -----------------------------------------------------------------------

    def handle_inbound(self, stream: Any) -> None:
        """The listener's handler: runs for the whole life of the inbound connection."""
        ip = stream.remote_ip
        if self.closing:
            return
        if self.is_banned(ip):
            self.metrics.inc("refused.banned")
            log.debug("refused %s: banned", stream)
            return
        if self.pending >= self.config.max_pending:
            self.metrics.inc("refused.pending")
            log.debug("refused %s: %d handshakes pending", stream, self.pending)
            return
        if self._per_ip[ip] >= self.config.max_per_ip:
            self.metrics.inc("refused.per_ip")
            log.debug("refused %s: %d sockets from %s", stream, self._per_ip[ip], ip)
            return
        self.pending += 1
        self._per_ip[ip] += 1
        pending = True
        try:
            result = self._inbound_handshake(stream)
            self.pending -= 1
            pending = False
            if result is None:
                return
            info, reader, ack = result
            reason = self._admission(info)
            if reason is not None or self.closing:
                reason = reason or DisconnectReason.SHUTDOWN
                self.metrics.inc(f"refused.{reason.name}")
                handshake.refuse(stream, self.local, reason, "refused after handshake")
                return
            peer = self._make_peer(info, stream, reader)
            peer.start(first_frames=ack)
            self._register(peer)
            peer.wait_closed()
        finally:
            if pending:
                self.pending -= 1
            self._per_ip[ip] -= 1
            if not self._per_ip[ip]:
                del self._per_ip[ip]

    def _inbound_handshake(self, stream: Any) -> tuple | None:
        try:
            with gevent.Timeout(self.config.handshake_timeout, HandshakeTimeout()):
                return handshake.inbound(stream, self.local)
        except HandshakeError as exc:
            self._handshake_failed(stream, exc.reason, exc)
            if exc.reason in VIOLATIONS and not exc.remote:
                self.discourage(stream.remote_ip, exc.reason)
        except ProtocolError as exc:
            self._handshake_failed(stream, exc.reason, exc)
            self.discourage(stream.remote_ip, exc.reason)
        except OSError as exc:
            self._handshake_failed(stream, DisconnectReason.CONNECTION_LOST, exc)
        return None

    def _handshake_failed(self, stream: Any, reason: DisconnectReason, exc: BaseException) -> None:
        self.metrics.inc(f"handshake_failed.{reason.name}")
        quiet = reason in (DisconnectReason.DUPLICATE, DisconnectReason.SELF_CONNECTION)
        log.log(logging.DEBUG if quiet else logging.INFO, "handshake with %s failed: %s (%s)",
                stream.remote_address, reason.name, exc)

    # -- outbound ----------------------------------------------------------------------

    def find(self, address: str) -> Peer | None:
        """The ready peer known to listen at ``address``, if any.

        A peer's own claim counts only when it matches the IP its socket comes from, so a
        peer cannot stop us dialling an address by claiming it.
        """
        host = address.rpartition(":")[0].strip("[]")
        for peer in self.by_id.values():
            if peer.dialed_address == address or (peer.address == address and peer.remote_ip == host):
                return peer
        return None

    def connect(self, address: str, timeout: float | None = None) -> Peer:
        """Dial ``address`` and return the ready Peer (the surviving one for a duplicate).

        Raises :class:`PeerGone` when the TCP connection fails, :class:`HandshakeError`
        (or :class:`HandshakeTimeout`) when the handshake does.
        """
        if address in self.own_addresses or address == self.local.listen:
            raise HandshakeError(f"{address} is this node", DisconnectReason.SELF_CONNECTION)
        existing = self.find(address)
        if existing is not None:
            return existing
        if self.is_banned(parse_address(address)[0]):
            raise PeerGone(f"{address} is banned")
        # a transport may bound the dials in flight (connect and handshake) across many
        # nodes: a swarm in one process does, so its start is not one burst
        slot = getattr(self.transport, "dial_slot", None)
        with slot() if slot is not None else contextlib.nullcontext():
            return self._connect(address, timeout)

    def _connect(self, address: str, timeout: float | None) -> Peer:
        self.book.attempt(address, time.time())
        connect_timeout = timeout or self.config.connect_timeout
        try:
            stream = self.transport.dial(address, connect_timeout, self.config.source_host)
        except OSError as exc:
            self.metrics.inc("dial_failed")
            self.book.failed(address, time.time())
            raise PeerGone(f"cannot connect to {address}: {exc}") from None
        try:
            with gevent.Timeout(timeout or self.config.handshake_timeout, HandshakeTimeout()):
                info, reader = handshake.outbound(stream, self.local)
        except (HandshakeError, ProtocolError, OSError) as exc:
            stream.close()
            return self._outbound_failed(address, exc)
        except BaseException:
            # killed mid-handshake (the node is stopping): the dying greenlet's traceback
            # would otherwise keep the socket open
            stream.close()
            raise
        if self.closing:
            stream.close()
            raise PeerGone("node is stopping")
        peer = self._make_peer(info, stream, reader)
        peer.dialed_address = address
        self.book.good(address, time.time(), peer.id)
        peer.start()
        if not self._register(peer):
            survivor = self.by_id.get(peer.id)
            if survivor is None:
                raise PeerGone(f"duplicate connection to {short_id(peer.id)} closed")
            return survivor
        return peer

    def _outbound_failed(self, address: str, exc: BaseException) -> Peer:
        now = time.time()
        if isinstance(exc, OSError):
            self.metrics.inc("dial_failed")
            self.book.failed(address, now)
            raise PeerGone(f"connection to {address} lost during the handshake: {exc}") from None
        reason = getattr(exc, "reason", DisconnectReason.PROTOCOL_ERROR)
        self.metrics.inc(f"handshake_failed.{reason.name}")
        remote_id = getattr(exc, "remote_id", None)
        if reason == DisconnectReason.SELF_CONNECTION:
            self.own_addresses.add(address)
            self.book.set_own(self.book.own | {address}, self.book.own_id)
            self.book.remove(address)
            log.info("%s is this node itself: not dialling it again", address)
        elif reason == DisconnectReason.DUPLICATE and remote_id:
            self.book.add(address, remote_id, None, now)  # connected already: select skips its id
        else:  # refused, full or broken: back off before trying it again
            self.book.failed(address, now)
        if isinstance(exc, ProtocolError) or (isinstance(exc, HandshakeError) and reason in VIOLATIONS
                                              and not exc.remote):
            self.discourage(parse_address(address)[0], reason)
        if reason == DisconnectReason.DUPLICATE and remote_id:
            survivor = self._wait_for(remote_id, SWAP_GRACE)
            if survivor is not None:
                return survivor
        if isinstance(exc, ProtocolError):
            raise HandshakeError(str(exc), reason, remote_id) from None
        raise exc

    def _wait_for(self, node_id: str, timeout: float) -> Peer | None:
        with gevent.Timeout(timeout, False):
            while node_id not in self.by_id:
                self.wait_change(None)
        return self.by_id.get(node_id)

    def close(self) -> None:
        """Stop admitting; pending duplicate swaps are settled without events."""
        self.closing = True
        self._stop.set()
        for timer in self._deferred.values():
            timer.kill(block=False)
