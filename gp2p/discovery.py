"""Discovery: ``getaddr`` / ``addr`` exchange, self-announcement and relay of fresh addresses.

- After an outbound handshake we ask ``getaddr``; the answer (an ``addr`` marked
  ``reply: true``, honoured only while we wait for one) is *solicited* and not rate-limited.
  Each connection also gets our own listen address once.
- We answer ``getaddr`` at most once per connection per minute with a sample of the book (at
  most 1000 entries and about a quarter of it, but at least 32, tried and recent ones
  preferred). A node short of addresses asks a peer it has not asked yet, or, once it has
  asked them all, asks again the one it asked longest ago (at most every two minutes), so
  that it also learns of nodes that joined after its own questions.
- Unsolicited ``addr`` entries are limited per peer by a token bucket; fresh ones (seen in the
  last 10 minutes) arriving in small messages are relayed to 2 random other peers, at most
  once per address per relay window, so a new node becomes known without polling.
- Malformed entries are skipped one by one; the good ones in the same message are kept. More
  than 1000 entries is a protocol violation (checked in :mod:`gp2p.messages`).
"""
from __future__ import annotations

import logging
import math
import random
import time
from collections import OrderedDict
from typing import Any, Callable, Iterable

from gp2p.addressbook import AddressBook
from gp2p.identity import is_node_id
from gp2p.netgroup import canonical_address
from gp2p.ratelimit import TokenBucket

log = logging.getLogger(__name__)

__all__ = ["Discovery"]

#: unsolicited addr entries a peer may send: a burst, then this many per second (Bitcoin's)
ADDR_RATE = 0.1
ADDR_BURST = 1000.0
#: a getaddr answer holds at most this many entries, and at most this share of the book
MAX_ANSWER = 1000
ANSWER_FRACTION = 0.25
#: ...but never fewer than this many entries: the fraction keeps a large book from being
#: scraped in one question; in a small network it would make a newcomer learn one address
#: per connection and leave it short of peers that are there to be had
ANSWER_FLOOR = 32
#: entries seen this recently are worth relaying
FRESH = 600.0
#: only messages this small are relayed (large ones are answers, not announcements)
RELAY_MAX_ENTRIES = 10
RELAY_FANOUT = 2
#: relayed addresses wait up to this long to share one addr message per peer (the node
#: calls :meth:`Discovery.flush`): when many nodes join at once, every node relays every
#: newcomer, and one message per address per peer would cost more than the rest of the join
RELAY_INTERVAL = 0.5
#: addresses handed to a peer we evict
FAREWELL_ENTRIES = 100
RELAYED_MEMORY = 20_000
#: a node asks the first few outbound peers for addresses as they connect (several sources,
#: so that no one peer shapes its view), later ones only when it runs short (``ask_more``):
#: a small book keeps only part of each answer, and asking every new peer while it stays
#: small made addresses most of the work of 10,000 nodes joining at once
ASK_SOURCES = 3
#: a getaddr answer's sample is reused for this long, unless a tenth of the book is new
#: since: askers in that time get the same sample, so asking again scrapes nothing more
#: (Bitcoin Core caches its answer for a day), and a seed asked by thousands of joiners
#: samples its book once, not thousands of times
ANSWER_CACHE = 30.0
#: a connection gets at most one getaddr answer per this many seconds...
ANSWER_INTERVAL = 60.0
#: ...and a node short of addresses asks a peer again only after this long (and only once
#: every peer has been asked): otherwise a node that asked each of its peers once would
#: never learn of nodes that joined after, unless a relay happened to reach it
REASK_AFTER = 120.0


class _PeerState:
    __slots__ = ("bucket", "asked", "asked_at", "answered_at")

    def __init__(self, now: float):
        self.bucket = TokenBucket(ADDR_RATE, ADDR_BURST, now)
        self.asked = False                   # we sent getaddr and its answer has not come yet
        self.asked_at: float | None = None   # when we last sent it getaddr
        self.answered_at: float | None = None  # when we last answered its getaddr


def _entry(raw: Any, now: float) -> tuple[str, str | None, float] | None:
    """A checked (address, node id, seen) from one wire entry, or None when malformed."""
    if not isinstance(raw, dict):
        return None
    address = canonical_address(raw.get("address"))
    node_id = raw.get("id")
    seen = raw.get("seen", now)
    if address is None or (node_id is not None and not is_node_id(node_id)):
        return None
    if isinstance(seen, bool) or not isinstance(seen, (int, float)) or not math.isfinite(seen):
        return None
    return address, node_id, float(seen)


class Discovery:
    """The discovery protocol of one node, around its :class:`AddressBook`."""

    def __init__(self, book: AddressBook, metrics: Any, *, node_id: str,
                 own_address: Callable[[], str | None], peers: Callable[[], Iterable[Any]],
                 learned: Callable[[], None], rng: random.Random | None = None,
                 clock: Callable[[], float] = time.time,
                 relay_pending: Callable[[], None] = lambda: None):
        self.book = book
        self._metrics = metrics
        self._node_id = node_id
        self._own_address = own_address
        self._peers = peers
        self._learned = learned
        self._rng = rng or random.Random()
        self._clock = clock
        self._state: dict[Any, _PeerState] = {}
        self._relayed: OrderedDict[str, float] = OrderedDict()
        #: peer -> relayed entries not sent yet (see RELAY_INTERVAL); ``relay_pending()`` is
        #: called when some wait, so that an idle node's flusher can sleep
        self._outbox: dict[Any, list[dict]] = {}
        self._relay_pending = relay_pending
        self._reasked_at = -math.inf
        self._asked_sources = 0
        #: (when, book's added counter then, entries): see ANSWER_CACHE
        self._answer: tuple[float, int, list[dict]] | None = None

    def __repr__(self) -> str:
        return f"<Discovery book={len(self.book)} peers={len(self._state)}>"

    def _send(self, peer: Any, entries: list[dict], reply: bool = False) -> None:
        msg: dict[str, Any] = {"type": "addr", "addrs": entries}
        if reply:
            msg["reply"] = True
        peer.send_nowait(msg)

    def peer_ready(self, peer: Any) -> None:
        """A connection is ready: learn its announced address, announce ours, ask for more."""
        now = self._clock()
        state = self._state[peer] = _PeerState(now)
        if peer.direction == "inbound" and peer.address:
            # stays *new* until one of our own dials to it succeeds
            if self.book.add(peer.address, peer.id, peer.remote_ip, now):
                self._learned()
        own = self._own_address()
        if own:
            self._send(peer, [{"address": own, "id": self._node_id, "seen": now}])
        if (peer.direction == "outbound" and self._asked_sources < ASK_SOURCES
                and len(self.book) < self.book.capacity // 2):
            # a book at least half full has plenty to dial: asking every new outbound peer
            # anyway would have each of thousands of nodes take in hundreds of addresses per
            # connection for nothing (the dialer still asks when it runs short: ask_more)
            self._asked_sources += 1
            self._ask(peer, state)

    def _ask(self, peer: Any, state: _PeerState) -> None:
        state.asked = True
        state.asked_at = self._clock()
        peer.send_nowait({"type": "getaddr"})

    def ask_more(self) -> bool:
        """The dialer is short of addresses: ask ``getaddr`` of one peer not asked yet (an
        inbound one, typically, or one that answered before we knew many); once every peer
        has been asked, of the one asked longest ago, if that was ``REASK_AFTER`` ago or more
        (and no other peer was asked again in that time). False if nobody may be asked now."""
        candidates = [(peer, state) for peer, state in self._state.items() if state.asked_at is None]
        if candidates:
            peer, state = self._rng.choice(candidates)
            self._metrics.inc("discovery.asked_more")
        else:
            now = self._clock()
            if now - self._reasked_at < REASK_AFTER:
                return False
            waiting = [(state.asked_at, peer, state) for peer, state in self._state.items()
                       if not state.asked and now - state.asked_at >= REASK_AFTER]
            if not waiting:
                return False
            _, peer, state = min(waiting, key=lambda item: item[0])
            self._reasked_at = now
            self._metrics.inc("discovery.asked_again")
        self._ask(peer, state)
        return True

    def peer_closed(self, peer: Any) -> None:
        self._state.pop(peer, None)
        self._outbox.pop(peer, None)

    def flush(self) -> None:
        """Send the relayed addresses that are waiting, one addr message per peer."""
        outbox, self._outbox = self._outbox, {}
        for peer, entries in outbox.items():
            if peer not in self._state:
                continue
            if getattr(peer, "congested", False):  # relays are optional: never a SLOW_PEER
                self._metrics.inc("discovery.relay_dropped", len(entries))
                continue
            self._send(peer, entries)

    def farewell(self, peer: Any) -> None:
        """Give a peer we are about to evict addresses to go to instead (unsolicited, so
        its token bucket applies), so that a crowded seed does not become a revolving door."""
        now = self._clock()
        sample = self.book.sample(now, FAREWELL_ENTRIES, 1.0, rng=self._rng)
        entries = [{"address": e.address, "id": e.node_id, "seen": e.last_seen}
                   for e in sample if e.node_id != peer.id]
        if entries:
            self._send(peer, entries)

    def on_getaddr(self, peer: Any, msg: dict) -> None:
        state = self._state.get(peer)
        now = self._clock()
        if state is None or (state.answered_at is not None and now - state.answered_at < ANSWER_INTERVAL):
            self._metrics.inc("discovery.getaddr_ignored")
            return
        state.answered_at = now
        limit = min(MAX_ANSWER, max(ANSWER_FLOOR, math.ceil(ANSWER_FRACTION * len(self.book))))
        entries = [e for e in self._answer_sample(now, limit)
                   if e["id"] != peer.id and e["address"] != peer.address][:limit]
        self._metrics.inc("discovery.getaddr_answered")
        self._send(peer, entries, reply=True)

    def _answer_sample(self, now: float, limit: int) -> list[dict]:
        """The cached sample of the book (see ANSWER_CACHE), drawn again when it is stale.
        It holds one spare entry, so that leaving out the asker's own does not shrink an
        answer (in a small book, to nothing)."""
        added = self.book.counters["added"]
        cached = self._answer
        if (cached is None or now - cached[0] >= ANSWER_CACHE or now < cached[0]
                or added - cached[1] > len(self.book) // 10 or len(cached[2]) < min(limit + 1, len(self.book))):
            sample = self.book.sample(now, limit + 1, 1.0, rng=self._rng)
            cached = self._answer = (now, added, [{"address": e.address, "id": e.node_id, "seen": e.last_seen}
                                                  for e in sample])
            self._metrics.inc("discovery.answer_sampled")
        return cached[2]

    def on_addr(self, peer: Any, msg: dict) -> None:
        state = self._state.get(peer)
        if state is None:
            return
        now = self._clock()
        solicited = state.asked and msg.get("reply") is True
        if solicited:
            state.asked = False
        relay = not solicited and len(msg["addrs"]) <= RELAY_MAX_ENTRIES
        added = 0
        for raw in msg["addrs"]:
            entry = _entry(raw, now)
            if entry is None:
                self._metrics.inc("discovery.malformed")
                continue
            if not solicited and not state.bucket.take(now):
                self._metrics.inc("discovery.rate_limited")
                continue
            address, node_id, seen = entry
            if not self.book.add(address, node_id, peer.remote_ip, now, seen):
                continue
            added += 1
            # only news is passed on: an address we knew already has been spreading
            # without us (relaying it anyway sends every address to every node twice over,
            # which dominates the cost of many nodes joining at once)
            if relay and now - FRESH <= seen <= now + 60:
                self._relay(peer, address, node_id, min(seen, now), now)
        self._metrics.inc("discovery.learned", added)
        if added:
            self._learned()

    def _relay(self, source: Any, address: str, node_id: str | None, seen: float, now: float) -> None:
        last = self._relayed.get(address)
        if last is not None and now - last < FRESH:
            return
        self._relayed[address] = now
        self._relayed.move_to_end(address)
        while len(self._relayed) > RELAYED_MEMORY:
            self._relayed.popitem(last=False)
        targets = [p for p in self._peers() if p is not source and p.id != node_id]
        for peer in self._rng.sample(targets, min(RELAY_FANOUT, len(targets))):
            box = self._outbox.setdefault(peer, [])
            box.append({"address": address, "id": node_id, "seen": seen})
            if len(box) >= RELAY_MAX_ENTRIES:
                self._outbox.pop(peer)
                if getattr(peer, "congested", False):
                    self._metrics.inc("discovery.relay_dropped", len(box))
                else:
                    self._send(peer, box)
            else:
                self._relay_pending()
            self._metrics.inc("discovery.relayed")
