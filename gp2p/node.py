"""Node: wires transport, peers, dispatcher and peer manager together and owns every greenlet."""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

import gevent
from gevent.event import Event

from gp2p import transport as tcp_transport
from gp2p.addressbook import AddressBook, layout_for
from gp2p.bans import BanList
from gp2p.codec import by_name
from gp2p.datadir import DataDir
from gp2p.dialer import Dialer
from gp2p.discovery import RELAY_INTERVAL, Discovery
from gp2p.config import Config
from gp2p.dispatch import Context, Dispatcher
from gp2p.gossip import Gossip
from gp2p.errors import DisconnectReason, PeerGone
from gp2p.handshake import Local
from gp2p.identity import Identity, short_id
from gp2p.messages import check_outgoing
from gp2p.metrics import Metrics
from gp2p.peer import Peer
from gp2p.peermanager import PeerManager
from gp2p.rpc import Rpc
from gp2p.tasks import TaskGroup

log = logging.getLogger(__name__)

__all__ = ["Node"]

#: how often the address book and bans are saved to datadir (and at stop)
SAVE_INTERVAL = 60.0
#: listener slots beyond max_inbound + max_pending, so that a full node still accepts and
#: refuses at once (the dialler moves on) instead of leaving dials in the backlog to time out
REFUSAL_SLOTS = 32


class Node:
    """One gp2p node: it listens, dials, keeps peers alive and runs your handlers.

    ``Node(listen="127.0.0.1:0", bootstrap=[...], **config_fields)`` or
    ``Node(config=Config(...))``; passing both is a :class:`TypeError`. The constructor does
    no I/O: :meth:`start` binds and dials.
    """

    def __init__(self, *, config: Config | None = None, transport: Any = None, **fields: Any):
        if config is not None and fields:
            raise TypeError("pass either config= or config fields, not both")
        self.config = config if config is not None else Config(**fields)
        #: anything with ``listen(spec, handler, pool_size, on_error)`` and
        #: ``dial(address, timeout, source)``: TCP (:mod:`gp2p.transport`) unless given,
        #: e.g. a :class:`gp2p.memnet.MemoryNetwork`
        self.transport = transport if transport is not None else tcp_transport
        self.metrics = Metrics()
        self.identity: Identity | None = None if self.config.datadir else Identity()
        self.tasks: TaskGroup | None = None
        self._listener: tcp_transport.Listener | None = None
        self._pm: PeerManager | None = None
        self._stopped = Event()
        self._closing = Event()
        self._relay_wanted = Event()
        self._failure: BaseException | None = None
        self._datadir: DataDir | None = None
        self._bans = BanList()
        self._dialer: Dialer | None = None
        self._discovery: Discovery | None = None
        self._started = False
        self._closed = False
        self._dispatcher = Dispatcher(self.metrics, self.config.handler_concurrency,
                                      self.config.inbox_size, self.config.max_requests_per_peer)
        self._gossip: Gossip | None = None
        self._rpc = Rpc(self.metrics, self._dispatcher)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "started" if self._started else "new"
        peers = len(self._pm.by_id) if self._pm else 0
        return f"<Node {short_id(self.id)} {self.address or '-'} {state} peers={peers}>"

    # -- properties --------------------------------------------------------------------

    @property
    def id(self) -> str | None:
        """This node's id (hex Ed25519 public key); None before start when it lives in datadir."""
        return self.identity.id if self.identity else None

    @property
    def address(self) -> str | None:
        """The listen address peers are told (``advertise``, else the bound one)."""
        if self._listener is None:
            return None
        return self.config.advertise or self._listener.address

    @property
    def peers(self) -> list[Peer]:
        """The ready peers, one per node id."""
        return list(self._pm.by_id.values()) if self._pm else []

    @property
    def started(self) -> bool:
        return self._started

    @property
    def closed(self) -> bool:
        return self._closed

    # -- handlers ----------------------------------------------------------------------

    def on(self, kind: str, *, context: bool = False,
           validate: Callable[[Any, Any], bool] | None = None) -> Callable[[Callable], Callable]:
        """Register the handler of ``kind``: ``fn(peer, payload)``, or
        ``fn(peer, payload, ctx)`` with ``context=True``. ``validate(peer, payload) -> bool``
        runs first; a rejected message is dropped and counted. Returns ``fn`` unchanged."""
        return self._dispatcher.on(kind, context=context, validate=validate)

    def on_event(self, name: str) -> Callable[[Callable], Callable]:
        """Add a listener: ``peer_connected`` -> ``fn(peer)``; ``peer_disconnected`` ->
        ``fn(peer, reason)``."""
        return self._dispatcher.on_event(name)

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> "Node":
        """Listen and start dialling; returns once listening. On failure, closes what it
        opened and re-raises."""
        if self._started:
            raise RuntimeError(f"{self!r} was already started")
        self._started = True
        cfg = self.config
        try:
            book = AddressBook(**layout_for(cfg.max_addresses))
            if cfg.datadir:
                self._datadir = DataDir(cfg.datadir)
                self.identity = self._datadir.identity()
                book = self._datadir.load_book(cfg.max_addresses)
                self._datadir.load_bans(self._bans)
            self.tasks = TaskGroup(f"node:{short_id(self.id)}", self._crashed)
            self._dispatcher.start(self.tasks)
            self._local = Local(identity=self.identity, network_id=cfg.network_id,
                                codec=by_name(cfg.codec), max_frame_size=cfg.max_frame_size,
                                agent=cfg.agent)
            self._pm = PeerManager(cfg, self._local, self.tasks, self.metrics, route=self._route,
                                   attach=self._dispatcher.attach, connected=self._peer_connected,
                                   disconnected=self._peer_disconnected, ready=self._peer_ready,
                                   closed=self._peer_closed, book=book, bans=self._bans,
                                   evicting=lambda peer: self._discovery.farewell(peer),
                                   transport=self.transport,
                                   on_error=self._crashed)
            self._dialer = Dialer(self._pm, need_addresses=lambda: self._discovery.ask_more())
            self._gossip = Gossip(self.identity.id, cfg, self.metrics, self._dispatcher,
                                  peers=self._pm.by_id.values, encode=self._local.encode)
            self._discovery = Discovery(book, self.metrics, node_id=self.identity.id,
                                        own_address=lambda: self.address,
                                        peers=self._pm.by_id.values, learned=self._dialer.wake,
                                        relay_pending=self._relay_wanted.set)
            if cfg.listen is not None:
                self._listener = self.transport.listen(cfg.listen, self._pm.handle_inbound,
                                                       cfg.max_inbound + cfg.max_pending + REFUSAL_SLOTS,
                                                       on_error=self._crashed)
                self._local.listen = self.address
                book.set_own([self.address, self._listener.address], self.identity.id)
            self.metrics.gauge("peers", lambda: len(self._pm.by_id))
            self.metrics.gauge("addresses", lambda: len(book))
            self.metrics.gauge("gossip.seen_evicted", lambda: self._gossip.seen.evicted)
            self._dialer.start()
            self.tasks.spawn("relay", self._relay_loop)
            if self._datadir is not None:
                self.tasks.spawn("saver", self._save_loop)
        except BaseException:
            self._shutdown(timeout=1.0)
            raise
        log.info("node %s started on %s", short_id(self.id), self.address or "(client only)")
        return self

    def _crashed(self, greenlet: Any, exc: BaseException | None = None) -> None:
        """An owned greenlet died of an unexpected exception: stop the node."""
        if exc is None:  # called by the transport with the exception only
            exc = greenlet
        if self._failure is None:
            self._failure = exc
        if not self._closed:
            TaskGroup(f"node:{short_id(self.id)}:crash").spawn("stop", self.stop)

    def stop(self, timeout: float | None = None) -> None:
        """Stop the node; idempotent, and bounded by ``timeout`` (default 5 s).

        Order: stop accepting and dialling; send ``disconnect(SHUTDOWN)`` to every peer and
        give writers ``close_linger`` to flush; let the dispatcher run what is queued
        (``peer_disconnected`` included); kill leftovers, logging each by name. Afterwards
        no greenlet or socket of this node is left.
        """
        if self._closed:
            return
        self._shutdown(5.0 if timeout is None else timeout)

    def kill(self, block: bool = True) -> list:
        """Stop abruptly, as if the process had died: every socket is reset, every greenlet
        killed; no ``disconnect`` is sent, no handler or event runs, nothing is saved.
        For fault tests and ``gp2p swarm --kill``; idempotent. With ``block=False`` the
        greenlets are only told to die and returned, for the caller to join (killing many
        nodes then takes one pass of the hub instead of one each)."""
        if self._closed:
            return []
        self._closed = True
        self._closing.set()
        self._relay_wanted.set()  # wakes the relay loop, which then sees _closing
        if self._listener is not None:
            self._listener.close()
        if self._dialer is not None:
            self._dialer.close()
        # every greenlet is told to die first and joined once: killing peer by peer would
        # wait a hub iteration per peer, seconds per node in a busy swarm
        victims = []
        if self._pm is not None:
            self._pm.close()
            for peer in list(self._pm.connections) + list(self._pm.lingering):
                victims += peer.kill(reset=True, block=False)
        self._dispatcher.close()
        if self.tasks is not None:
            victims += self.tasks.kill(quiet=True, block=False)
        if self._listener is not None:
            abort = getattr(self._listener, "abort", None)
            if abort is not None:
                victims += abort()
            else:
                self._listener.stop(timeout=0)
        if block:
            gevent.joinall(victims, timeout=1.0)
        self._stopped.set()
        log.info("node %s killed", short_id(self.id))
        return victims

    def _shutdown(self, timeout: float) -> None:
        self._closed = True
        self._closing.set()
        self._relay_wanted.set()  # wakes the relay loop, which then sees _closing
        deadline = time.monotonic() + timeout
        if self._listener is not None:
            self._listener.close()
        pm = self._pm
        if self._dialer is not None:
            self._dialer.close()
            pm.book.anchors = self._dialer.anchors()
        if pm is not None:
            pm.close()
            peers = list(pm.connections)
            for peer in peers:
                peer.close(DisconnectReason.SHUTDOWN, "node stopping")
            peers += list(pm.lingering)  # closed earlier, still flushing or lingering
            for peer in peers:
                peer.wait_closed(max(0.0, deadline - time.monotonic()))
        self._dispatcher.wait_quiet(max(0.0, deadline - time.monotonic()))
        self._dispatcher.close()
        if self._listener is not None:
            self._listener.stop(timeout=max(0.1, deadline - time.monotonic()))
        if pm is not None:
            for peer in list(pm.connections) + peers:
                if peer.state != "closed":
                    peer.kill()
        if self.tasks is not None:
            self.tasks.stop(timeout=max(0.1, deadline - time.monotonic()))
        self._save()
        self._stopped.set()
        log.info("node %s stopped", short_id(self.id))

    def _save(self) -> None:
        if self._datadir is None or self._pm is None:
            return
        try:
            self._datadir.save_book(self._pm.book)
            self._datadir.save_bans(self._bans)
        except OSError:
            log.exception("could not save the address book or bans in %s", self._datadir.path)

    def _relay_loop(self) -> None:
        # relayed addresses wait up to RELAY_INTERVAL to share a message; an idle node's
        # loop sleeps until some are queued (thousands of nodes in a swarm)
        while True:
            self._relay_wanted.wait()
            if self._closing.wait(RELAY_INTERVAL):
                return
            self._relay_wanted.clear()
            self._discovery.flush()

    def _save_loop(self) -> None:
        while not self._closing.wait(SAVE_INTERVAL):
            self._save()

    def serve_forever(self) -> None:
        """Start if needed, then block until the node stops; re-raise what crashed it."""
        if not self._started:
            self.start()
        self._stopped.wait()
        if self._failure is not None:
            raise self._failure

    def __enter__(self) -> "Node":
        if not self._started:
            self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    # -- peers -------------------------------------------------------------------------

    def connect(self, address: str, timeout: float | None = None) -> Peer:
        """Dial ``address`` and return the ready Peer (the surviving one for a duplicate)."""
        self._require_started()
        return self._pm.connect(address, timeout)

    def wait_for_peers(self, n: int, timeout: float | None = None) -> bool:
        """Block until at least ``n`` peers are ready; False if ``timeout`` passes first."""
        self._require_started()
        deadline = None if timeout is None else time.monotonic() + timeout
        while len(self._pm.by_id) < n:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            self._pm.wait_change(remaining)
        return True

    def _require_started(self) -> None:
        if not self._started or self._closed:
            raise RuntimeError(f"{self!r} is not running")

    def ban(self, target: str, seconds: float = 24 * 3600.0) -> None:
        """Ban an address or subnet (``"127.0.0.5"``, ``"127.0.0.0/24"``, ``"host:port"``
        counts as its host) for ``seconds``: matching peers are disconnected with BANNED,
        new connections from it are refused before their handshake, and it is not dialled.
        Bans persist in ``datadir``."""
        network = self._bans.ban(target, seconds, time.time())
        log.info("banned %s for %gs", network, seconds)
        if self._pm is not None:
            for peer in list(self._pm.connections):
                if self._bans.is_banned(peer.remote_ip, time.time()):
                    peer.close(DisconnectReason.BANNED, "banned")
        if self._datadir is not None:
            self._datadir.save_bans(self._bans)

    def unban(self, target: str) -> bool:
        """Lift the ban on exactly ``target`` (as given to :meth:`ban`); True if there was one."""
        found = self._bans.unban(target)
        if found and self._datadir is not None:
            self._datadir.save_bans(self._bans)
        return found

    @property
    def banned(self) -> dict[str, float]:
        """Active bans: subnet -> until (wall-clock seconds)."""
        return self._bans.banned(time.time())

    def _resolve(self, peer_or_id: Peer | str) -> Peer:
        node_id = peer_or_id.id if isinstance(peer_or_id, Peer) else peer_or_id
        peer = self._pm.by_id.get(node_id) if self._pm else None
        if peer is None:
            raise PeerGone(f"not connected to {short_id(node_id)}")
        return peer

    # -- messages ----------------------------------------------------------------------

    def send(self, peer_or_id: Peer | str, kind: str, payload: Any = None) -> None:
        """Send ``payload`` to one peer's handler of ``kind``.

        Waits up to ``send_timeout`` for room in the peer's out-queue; raises
        :class:`PeerGone` if the peer is not connected (or is closed as too slow).
        """
        check_outgoing(kind, payload)
        self._resolve(peer_or_id).send_message({"type": "msg", "kind": kind, "payload": payload})

    def broadcast(self, kind: str, payload: Any = None) -> str:
        """Send ``payload`` to the handler of ``kind`` on every node of the network, once
        each, this node's included (with ``peer=None``); return the message id (hex).

        Waits up to ``send_timeout`` per peer for room in its out-queue (a peer that stays
        full is closed with SLOW_PEER and skipped).
        """
        check_outgoing(kind, payload)
        self._require_started()
        return self._gossip.broadcast(kind, payload)

    def request(self, peer_or_id: Peer | str, kind: str, payload: Any = None,
                timeout: float = 5.0) -> Any:
        """Ask one peer's handler of ``kind`` and return what it returns.

        Blocks only the calling greenlet. Raises :class:`RemoteError` when the remote
        handler raised (``.type``, ``.message``), when nobody handles ``kind`` there
        (type ``NoHandler``) or its answer cannot be encoded (``EncodeError``);
        :class:`RequestTimeout` after ``timeout`` seconds; :class:`PeerGone` when the
        peer is not connected or goes away first.
        """
        check_outgoing(kind, payload)
        self._require_started()
        return self._rpc.request(self._resolve(peer_or_id), kind, payload, timeout)

    def _route(self, peer: Peer, mtype: str, msg: dict) -> None:
        """Everything a peer's reader does not handle itself."""
        if mtype == "msg":
            peer.last_useful = time.monotonic()
            dispatcher = self._dispatcher
            dispatcher.submit(peer, dispatcher.deliver, peer, msg["kind"], msg["payload"],
                              Context("send", peer.id))
        elif mtype == "gossip":
            self._gossip.on_frame(peer, msg)
        elif mtype == "request":
            peer.last_useful = time.monotonic()
            self._rpc.on_request(peer, msg)
        elif mtype == "response":
            self._rpc.on_response(peer, msg)
        elif mtype == "addr":
            self._discovery.on_addr(peer, msg)
        elif mtype == "getaddr":
            self._discovery.on_getaddr(peer, msg)
        else:
            self.metrics.inc("unknown_types")
            log.debug("ignored unknown message type %r from %r", mtype, peer)

    def _peer_ready(self, peer: Peer) -> None:
        self._discovery.peer_ready(peer)

    def _peer_closed(self, peer: Peer, reason: DisconnectReason) -> None:
        self._rpc.peer_closed(peer, reason)
        self._discovery.peer_closed(peer)
        self._dialer.wake()

    def _peer_connected(self, peer: Peer) -> None:
        self._dispatcher.submit_final(peer, self._dispatcher.emit, "peer_connected", peer)

    def _peer_disconnected(self, peer: Peer, reason: DisconnectReason) -> None:
        self._dispatcher.submit_final(peer, self._dispatcher.emit, "peer_disconnected", peer, reason)

