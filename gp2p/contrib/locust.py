"""Load-test a gp2p node with locust: each simulated user is one client-only gp2p node.

Install with ``pip install 'gp2p[locust]'``. Importing this module imports locust, which
monkey-patches gevent (gp2p works patched); the gp2p core never imports it.

A user reads locust's ``--host`` as ``gp2p://HOST:PORT``, runs its own client-only
:class:`~gp2p.Node` and keeps one connection to that target, opened by the first task and
again by the next task after it is lost. Each operation fires one locust request event
(``request_type="gp2p"``) named after it, with its timing:

- ``connect``: ``node.connect(target)``, only when not connected; success = handshake done.
- ``ping``: :meth:`Peer.ping`; success = a pong came back.
- ``send``: ``node.send(peer, "load.msg", payload)``; success = queued.
- ``request``: ``node.request(peer, "load.echo", payload)``; success = the payload came back.
- ``broadcast``: ``node.broadcast("load.gossip", payload)``; success = sent.

Only gp2p's network outcomes count as failures (:class:`RemoteError`, :class:`RequestTimeout`
and :class:`PeerGone`, plus :class:`PeerTimeout` for a ping and :class:`HandshakeError` for a
connect); any other exception is a bug and propagates to locust, which reports it as an error.
The target is usually ``gp2p node --echo``, which answers ``load.echo`` and quietly accepts the
other two kinds.
"""
from __future__ import annotations

import ipaddress
import itertools
import logging
import os
import socket
import time
from typing import Any, Callable

from locust import TaskSet, User, task

from gp2p.config import format_address, parse_address
from gp2p.errors import HandshakeError, PeerGone, PeerTimeout, RemoteError, RequestTimeout
from gp2p.node import Node
from gp2p.peer import READY, Peer

log = logging.getLogger(__name__)

__all__ = ["P2PUser", "P2PTasks", "EchoMismatch", "parse_target", "loopback_source"]

SCHEME = "gp2p://"
#: what a task's own operation may fail with (anything else is a bug and propagates)
FAILURES = (RemoteError, RequestTimeout, PeerGone)


class EchoMismatch(Exception):
    """A ``load.echo`` request was answered with something other than its payload."""


def parse_target(host: str | None) -> str:
    """``"gp2p://10.0.0.5:7000"`` -> ``"10.0.0.5:7000"``; a clear ValueError otherwise."""
    if not host or not host.startswith(SCHEME):
        raise ValueError(f"P2PUser needs the target node as --host gp2p://HOST:PORT, not {host!r}")
    address = host[len(SCHEME):].rstrip("/")
    try:
        host_part, port = parse_address(address)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"bad --host {host!r}: {exc}") from None
    if port == 0:
        raise ValueError(f"bad --host {host!r}: the target's port is needed")
    if host_part == "localhost":  # dial IPv4 loopback, so a 127.a.b.c source fits
        host_part = "127.0.0.1"
    return format_address(host_part, port)


def _is_loopback_v4(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.version == 4 and ip.is_loopback


def loopback_source(pid: int, number: int, avoid: str) -> str:
    """The 127.a.b.c a user dials from: ``a`` from the worker process id (never 0, so never
    127.0.0.1 nor the 127.0.x.y that local nodes and tests use), ``b.c`` from the user's
    ``number`` in that process, skipping ``avoid`` (the target's own IP). Distinct for 65,023
    users per process; two worker processes share addresses only if their pids are equal
    modulo 254 (then two users per address: harmless below the target's ``max_per_ip``)."""
    prefix = f"127.{1 + pid % 254}."
    slots = 256 * 254  # b in 0..255, c in 1..254
    skip = slots - 1
    if avoid.startswith(prefix):
        b, _, c = avoid[len(prefix):].partition(".")
        if b.isdigit() and c.isdigit() and 1 <= int(c) <= 254:
            skip = int(b) * 254 + int(c) - 1
    n = number % (slots - 1)  # one slot is always left out, so the cycle never depends on avoid
    if n >= skip:
        n += 1
    b, c = divmod(n, 254)
    return f"{prefix}{b}.{c + 1}"


_numbers = itertools.count()
_aliases_ok: bool | None = None


def _loopback_aliases_work(address: str) -> bool:
    """Whether this system can bind 127.x addresses other than 127.0.0.1 (Linux can, macOS
    only after ``ifconfig lo0 alias``); checked once per process. bind() never blocks."""
    global _aliases_ok
    if _aliases_ok is None:
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            probe.bind((address, 0))
            _aliases_ok = True
        except OSError as exc:
            _aliases_ok = False
            log.warning("cannot bind %s (%s): every user dials from the default loopback "
                        "address, so the target's max_per_ip applies to all of them", address, exc)
        finally:
            probe.close()
    return _aliases_ok


class P2PUser(User):
    """A locust user that is one client-only gp2p node connected to the ``--host`` target.

    Subclass it with ``@task`` methods that call :meth:`ping`, :meth:`send`,
    :meth:`request` and :meth:`broadcast`, or set ``tasks = [P2PTasks]``. Each call returns
    its result (None after a failure, which has been reported to locust already).
    """

    abstract = True
    #: bytes of random payload for send, request and broadcast
    payload_size: int = 64
    #: seconds a connect, ping or request may take
    timeout: float = 5.0
    #: seconds ``on_stop`` gives the node to say goodbye
    node_stop_timeout: float = 2.0
    #: on a loopback target, dial from a 127.a.b.c of this user's own, so the target's
    #: per-IP cap (``max_per_ip``) sees each user as a different host
    distinct_loopback_sources: bool = True
    #: extra :class:`~gp2p.Config` fields for each user's node (``network_id``, ``codec``, ...)
    node_config: dict[str, Any] = {}
    #: message kinds of the four operations (the ones ``gp2p node --echo`` handles)
    msg_kind, echo_kind, gossip_kind = "load.msg", "load.echo", "load.gossip"

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        self.node: Node | None = None
        self.peer: Peer | None = None
        self.target: str | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def on_start(self) -> None:
        """Start this user's node and connect (a subclass that overrides it calls super)."""
        self.connected_peer()

    def on_stop(self) -> None:
        """Stop the node: ``disconnect(SHUTDOWN)`` to the target, then no greenlet or socket left."""
        if self.node is not None:
            self.node.stop(timeout=self.node_stop_timeout)
        self.peer = None

    def _start_node(self) -> Node:
        self.target = parse_target(self.host)
        fields: dict[str, Any] = {"listen": None, "target_outbound": 0, "bootstrap": [],
                                  "persistent_peers": [], "handler_concurrency": 4}
        target_ip = parse_address(self.target)[0]
        if self.distinct_loopback_sources and _is_loopback_v4(target_ip):
            source = loopback_source(os.getpid(), next(_numbers), avoid=target_ip)
            if _loopback_aliases_work(source):
                fields["source_address"] = source
        fields.update(self.node_config)
        node = self.node = Node(**fields)  # set first: on_stop stops it even if start is cut short
        # the target relays every user's broadcast to all the others: take them quietly
        node.on(self.gossip_kind)(lambda peer, payload: None)
        node.start()
        return node

    def connected_peer(self) -> Peer | None:
        """The ready connection to the target, dialling it first when there is none; None
        when that failed (reported as a ``connect`` failure)."""
        if self.peer is not None and self.peer.state == READY:
            return self.peer
        node = self.node or self._start_node()
        start = time.perf_counter()
        try:
            self.peer = node.connect(self.target, timeout=self.timeout)
        except (PeerGone, HandshakeError) as exc:
            self.peer = None
            self._fire("connect", start, 0, exc)
            return None
        self._fire("connect", start, 0, None)
        return self.peer

    # -- operations --------------------------------------------------------------------

    def ping(self, name: str = "ping") -> float | None:
        """Ping the target; the round-trip time in seconds, None after a failure."""
        peer = self.connected_peer()
        if peer is None:
            return None
        _, rtt = self._measure(name, 0, lambda: peer.ping(timeout=self.timeout), PeerTimeout)
        return rtt

    def send(self, payload: Any = None, name: str = "send") -> bool:
        """Send one ``load.msg`` (random bytes unless ``payload`` is given); True once queued."""
        peer = self.connected_peer()
        if peer is None:
            return False
        payload = self._payload(payload)
        ok, _ = self._measure(name, len(payload), lambda: self.node.send(peer, self.msg_kind, payload))
        return ok

    def request(self, payload: Any = None, name: str = "request") -> Any:
        """Ask ``load.echo``; the answer when it equals the payload, None after a failure."""
        peer = self.connected_peer()
        if peer is None:
            return None
        payload = self._payload(payload)

        def echo() -> Any:
            answer = self.node.request(peer, self.echo_kind, payload, timeout=self.timeout)
            if answer != payload:
                raise EchoMismatch(f"{self.echo_kind} answered {answer!r:.80} instead of the payload")
            return answer

        _, answer = self._measure(name, len(payload), echo, EchoMismatch)
        return answer

    def broadcast(self, payload: Any = None, name: str = "broadcast") -> str | None:
        """Broadcast one ``load.gossip`` through the target; the message id, None after a failure."""
        if self.connected_peer() is None:
            return None
        payload = self._payload(payload)
        _, msg_id = self._measure(name, len(payload), lambda: self.node.broadcast(self.gossip_kind, payload))
        return msg_id

    # -- helpers -----------------------------------------------------------------------

    def _payload(self, payload: Any) -> Any:
        return os.urandom(self.payload_size) if payload is None else payload

    def _measure(self, name: str, length: int, call: Callable[[], Any],
                 *also_failures: type[BaseException]) -> tuple[bool, Any]:
        """Run ``call`` and report it: ``(True, result)``, or ``(False, None)`` after a failure."""
        start = time.perf_counter()
        try:
            result = call()
        except FAILURES + also_failures as exc:
            self._fire(name, start, length, exc)
            return False, None
        self._fire(name, start, length, None)
        return True, result

    def _fire(self, name: str, start: float, length: int, exc: BaseException | None) -> None:
        self.environment.events.request.fire(
            request_type="gp2p", name=name, response_time=(time.perf_counter() - start) * 1000.0,
            response_length=length, exception=exc, context={})


class P2PTasks(TaskSet):
    """The four operations as weighted tasks: ``tasks = [P2PTasks]`` on a :class:`P2PUser`."""

    @task(4)
    def request(self) -> None:
        self.user.request()

    @task(3)
    def send(self) -> None:
        self.user.send()

    @task(2)
    def ping(self) -> None:
        self.user.ping()

    @task(1)
    def broadcast(self) -> None:
        self.user.broadcast()
