"""Dialer: decides whom a node dials, and when.

- **Book dialling** keeps ``target_outbound`` outbound connections by picking addresses from
  the address book (tried ones preferred, network groups we already use avoided but never
  excluded). Anchors saved at the last clean stop are dialled first.
- **Seeds** (``bootstrap``) are dialled at start, and again only while the node has no ready
  peer and nothing dialable in its book. They count toward ``target_outbound`` like any
  outbound connection.
- **Persistent peers** are redialled for ever with exponential backoff and jitter, on top of
  ``target_outbound``.
All dials go through :meth:`PeerManager.connect`, which keeps the book informed.
"""
from __future__ import annotations

import logging
import random
import time
from typing import Any

import gevent
from gevent.event import Event

from gp2p.backoff import backoff_delay
from gp2p.errors import GP2PError, HandshakeError
from gp2p.netgroup import network_group
from gp2p.peer import Peer
from gp2p.peermanager import PeerManager

log = logging.getLogger(__name__)

__all__ = ["Dialer"]

BACKOFF_BASE = 0.5
BACKOFF_CAP = 60.0
#: dials from the book in flight at once, per node
MAX_DIALS = 8
#: how often an idle dial loop looks again even when nothing woke it
IDLE_CHECK = 5.0


class Dialer:
    """The outbound side of one node's connection management."""

    def __init__(self, pm: PeerManager, rng: random.Random | None = None,
                 need_addresses: Any = None):
        self.pm = pm
        self.config = pm.config
        self.book = pm.book
        self._rng = rng or random.Random()
        self._wake = Event()
        self._stop = Event()
        self._dialing: set[str] = set()
        self.persistent = set(self.config.persistent_peers)
        self._greenlets: list = []
        #: called when outbound peers are missing and the book has nobody to dial
        self._need_addresses = need_addresses

    def __repr__(self) -> str:
        return f"<Dialer {len(self._dialing)} dialling>"

    def start(self) -> None:
        if self.config.bootstrap:
            self._spawn("seeds", self._seed_loop)
        for address in self.config.persistent_peers:
            self._spawn(f"persistent:{address}", self._persistent_loop, address)
        if self.config.target_outbound > 0:
            self._spawn("dialer", self._book_loop)

    def _spawn(self, name: str, fn: Any, *args: Any) -> Any:
        self._greenlets = [g for g in self._greenlets if not g.dead]
        greenlet = self.pm.tasks.spawn(name, fn, *args)
        self._greenlets.append(greenlet)
        return greenlet

    def close(self) -> None:
        """Stop dialling: loops end and dials in flight are abandoned."""
        self._stop.set()
        self._wake.set()
        gevent.killall([g for g in self._greenlets if g is not gevent.getcurrent()], block=False)

    def wake(self) -> None:
        """Something changed (a peer left, the book learned addresses): look again."""
        self._wake.set()

    def _try(self, address: str) -> Peer | None:
        try:
            return self.pm.connect(address)
        except HandshakeError as exc:
            log.info("dial %s failed: %s", address, exc.reason.name)
        except GP2PError as exc:
            log.info("dial %s failed: %s", address, exc)
        return None

    def _outbound(self) -> list[Peer]:
        """Outbound peers that count toward ``target_outbound`` (persistent ones do not)."""
        return [p for p in self.pm.by_id.values()
                if p.direction == "outbound" and p.dialed_address not in self.persistent]

    def _book_loop(self) -> None:
        anchors = list(self.book.anchors)
        self.book.anchors = []
        for address in anchors:
            self._dial_from_book(address)
        while not self._stop.is_set():
            outbound = self._outbound()
            missing = self.config.target_outbound - len(outbound) - len(self._dialing)
            address = None
            if missing > 0 and len(self._dialing) < MAX_DIALS:
                address = self._select(outbound)
            if address is None:
                if missing > 0 and len(self._dialing) < MAX_DIALS and self._need_addresses is not None:
                    self._need_addresses()
                self._wake.wait(IDLE_CHECK)
                self._wake.clear()
                continue
            self._dial_from_book(address)

    def _select(self, outbound: list[Peer]) -> str | None:
        busy = set(self._dialing)
        busy.update(p.dialed_address for p in self.pm.by_id.values() if p.dialed_address)
        busy.update(p.address for p in self.pm.by_id.values() if p.address)
        busy.update(self.pm.own_addresses)
        groups = {network_group(p.remote_ip) for p in outbound}
        # with nothing banned, skip a ban lookup per book entry
        is_banned = self.pm.is_banned if len(self.pm.bans) else None
        return self.book.select(time.time(), exclude=busy, exclude_ids=set(self.pm.by_id),
                                is_banned=is_banned, rng=self._rng, avoid_groups=groups)

    def _dial_from_book(self, address: str) -> None:
        self._dialing.add(address)
        self._spawn(f"dial:{address}", self._book_dial, address)

    def _book_dial(self, address: str) -> None:
        try:
            self._try(address)
        finally:
            self._dialing.discard(address)
            self._wake.set()

    def _seed_loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            # with book dialling on, a dialable address in the book beats the seeds
            book_has_some = self.config.target_outbound > 0 and self._select(self._outbound())
            if self.pm.by_id or book_has_some:
                self.pm.wait_change(IDLE_CHECK)
                continue
            seeds = [a for a in self.config.bootstrap if a not in self.pm.own_addresses]
            if not seeds:
                return
            # a seed still backing off in the book (one that just evicted us, say) waits its
            # turn, or nodes that know only a full seed evict each other from it non-stop
            now = time.time()
            due = [a for a in seeds if self.book.retry_at(a) <= now]
            if not due:
                self._stop.wait(min(self.book.retry_at(a) for a in seeds) - now)
                continue
            dials = [self._spawn(f"seed:{a}", self._try, a) for a in due]
            gevent.joinall(dials)
            if any(g.value is not None for g in dials):
                failures = 0
                continue
            failures += 1
            self._stop.wait(backoff_delay(failures, BACKOFF_BASE, BACKOFF_CAP, self._rng.random()))

    def _persistent_loop(self, address: str) -> None:
        failures = 0
        while not self._stop.is_set() and address not in self.pm.own_addresses:
            peer = self._try(address)
            if peer is not None:
                peer.wait_closed()
                # a connection that dies young counts as a failure, so that a peer that
                # accepts and drops us at once is not redialled in a tight loop
                failures = 0 if time.monotonic() - peer.connected_at > 10 else 1
            else:
                failures += 1
            if failures:
                self._stop.wait(backoff_delay(failures, BACKOFF_BASE, BACKOFF_CAP, self._rng.random()))

    def anchors(self) -> list[str]:
        """Up to 2 outbound peers worth dialling first after a restart (longest connected)."""
        outbound = sorted((p for p in self._outbound() if p.dialed_address), key=lambda p: p.connected_at)
        return [p.dialed_address for p in outbound[:2]]
