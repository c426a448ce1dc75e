"""Address book: the peers a node knows of, bounded so that no one source can flood it (pure).

Modelled on Bitcoin Core's addrman, much simplified. Addresses learned from gossip are *new*
(unverified); a completed outbound handshake moves one to *tried*. Both tables are fixed arrays
of buckets of slots, and every entry owns exactly one slot, so the book never holds more than
``(new_buckets + tried_buckets) * bucket_size`` entries. Positions come from keyed BLAKE2b under
a per-node secret, which an attacker cannot predict:

- a new entry's bucket is chosen by (the network group of whoever told us, one of
  ``BUCKETS_PER_SOURCE_GROUP`` sub-buckets picked by the address), so one source group can
  only ever reach 8 of the new buckets, however many addresses it sends;
- a tried entry's bucket by (the entry's own group, one of 8 sub-buckets by address);
- the slot within a bucket by the address.

On a collision in *new* the occupant stays unless it is terrible (see
:meth:`AddressEntry.is_terrible`); otherwise the newcomer is dropped and counted. A collision
in *tried* moves the old tried entry back to *new*. Unlike Bitcoin, the entry's own group does
not narrow its new bucket further: that keeps the same per-source bound while letting a test
swarm that lives in one /16 use 8 buckets rather than one.

Nothing here reads the clock or does I/O: callers pass ``now`` (seconds, any epoch, as long as
it is consistent) and a :class:`random.Random`. :mod:`gp2p.addressfile` saves and loads books.
"""
from __future__ import annotations

import hashlib
import functools
import heapq
import math
import os
import random
import sys
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

from gp2p.backoff import backoff_delay
from gp2p.config import parse_address
from gp2p.identity import is_node_id
from gp2p.netgroup import canonical_address, network_group

__all__ = ["AddressBook", "AddressEntry", "layout_for", "network_group", "canonical_address"]

DAY = 86400.0
#: default layout: 256 x 32 = 8192 new + 64 x 32 = 2048 tried = 10240 entries
NEW_BUCKETS, TRIED_BUCKETS, BUCKET_SIZE = 256, 64, 32
#: how many new buckets one source group can reach (Bitcoin: 64 of 1024)
BUCKETS_PER_SOURCE_GROUP = 8
#: places a new address may take within its source group's buckets, tried in order: one
#: would make two addresses that hash alike shut each other out for good (a 20-node
#: swarm, all in one /16, hit that on about one run in four)
NEW_PROBES = 4
#: how many tried buckets one address group can reach (as in Bitcoin)
BUCKETS_PER_ADDRESS_GROUP = 8
MAX_ANCHORS = 2
#: select(): tables up to this size are scanned whole; bigger ones are sampled
SELECT_SCAN, SELECT_PROBES, SELECT_SAMPLE = 64, 48, 16
#: redial a node that evicted us after this many seconds, doubling per eviction up to the cap
EVICTED_BASE, EVICTED_CAP = 15.0, 600.0
#: a last_seen further than this in the future makes an entry terrible
FUTURE_SLACK = 600.0
#: entries not seen for this long are terrible
HORIZON = 30 * DAY


# the same addresses and ids are in the books of thousands of nodes in one swarm process:
# each book keeps one shared string for each, not its own copy
@functools.lru_cache(maxsize=65536)
def _host(address: str) -> str:
    return parse_address(address)[0]


def _shared_id(node_id: str | None) -> str | None:
    return sys.intern(node_id) if type(node_id) is str else node_id


@dataclass(eq=False, slots=True)
class AddressEntry:
    """One known address. Read its fields; change it only through :class:`AddressBook`.

    Times are in the caller's ``now`` units; 0 means never.
    """

    address: str                  #: canonical ``host:port``
    source: str                   #: network group of the peer that told us (ours: own group)
    node_id: str | None = None    #: hex node id, when known
    last_seen: float = 0.0        #: latest time anyone vouched for it (clamped to ``now``)
    last_success: float = 0.0     #: latest completed outbound handshake
    last_attempt: float = 0.0     #: latest dial started
    last_failure: float = 0.0     #: latest dial failed
    attempts: int = 0             #: dials started, ever
    failures: int = 0             #: consecutive failed dials since the last success
    tried: bool = False           #: in the tried table (verified) rather than new
    evictions: int = 0            #: times it evicted us lately (not saved)
    last_evicted: float = 0.0     #: latest time it evicted us (not saved)
    bucket: int = -1              #: position in its table
    slot: int = -1
    host: str = field(init=False, repr=False)
    group: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.host = _host(self.address)
        self.group = network_group(self.host)

    def is_terrible(self, now: float) -> bool:
        """True when the entry may be overwritten (Bitcoin's ``IsTerrible``).

        Never within a minute of a dial attempt; otherwise when last seen more than 10
        minutes in the future, never seen or unseen for 30 days, never reached after 3
        failures, or failed 10 times with no success for a week.
        """
        if self.last_attempt and now - self.last_attempt < 60:
            return False
        if self.last_seen > now + FUTURE_SLACK or not self.last_seen or now - self.last_seen > HORIZON:
            return True
        if not self.last_success and self.failures >= 3:
            return True
        return self.failures >= 10 and now - self.last_success > 7 * DAY

    def chance(self, now: float) -> float:
        """Relative weight when selecting (Bitcoin's ``GetChance``)."""
        weight = 0.66 ** min(self.failures, 8)
        if self.last_attempt and now - self.last_attempt < 600:
            weight *= 0.01
        return weight


def layout_for(capacity: int) -> dict[str, int]:
    """The bucket layout of a book holding at most ``capacity`` entries, a fifth tried."""
    if capacity < 2:
        raise ValueError("capacity must be at least 2")
    size = min(BUCKET_SIZE, max(1, capacity // 10))
    buckets = max(2, capacity // size)
    tried = max(1, buckets // 5)
    return {"new_buckets": buckets - tried, "tried_buckets": tried, "bucket_size": size}


class AddressBook:
    """Known peer addresses in bounded *new* and *tried* tables.

    :param secret: 32 random bytes that key the bucket hashes (default: fresh ones); keep it
        private, or an attacker can aim at chosen buckets
    :param new_buckets, tried_buckets, bucket_size: the layout; capacity is
        ``(new_buckets + tried_buckets) * bucket_size``. See :meth:`with_capacity`.
    :param rng: the random source of :meth:`select` and :meth:`sample` when none is passed
    :param backoff_base, backoff_cap: per-address redial backoff after failures, in seconds
    :param tried_bias: chance that :meth:`select` draws from *tried* when both tables can
    """

    def __init__(self, secret: bytes | None = None, *, new_buckets: int = NEW_BUCKETS,
                 tried_buckets: int = TRIED_BUCKETS, bucket_size: int = BUCKET_SIZE,
                 rng: random.Random | None = None, backoff_base: float = 1.0,
                 backoff_cap: float = 300.0, tried_bias: float = 0.5):
        secret = os.urandom(32) if secret is None else secret
        if not isinstance(secret, bytes) or len(secret) != 32:
            raise ValueError("secret must be 32 bytes")
        for name, value in (("new_buckets", new_buckets), ("tried_buckets", tried_buckets),
                            ("bucket_size", bucket_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer")
        if not 0.0 <= tried_bias <= 1.0:
            raise ValueError("tried_bias must be between 0 and 1")
        self.secret = secret
        self.new_buckets, self.tried_buckets, self.bucket_size = new_buckets, tried_buckets, bucket_size
        self.new_capacity, self.tried_capacity = new_buckets * bucket_size, tried_buckets * bucket_size
        #: the most entries the book can ever hold
        self.capacity = self.new_capacity + self.tried_capacity
        self.rng = rng if rng is not None else random.Random()
        self.backoff_base, self.backoff_cap, self.tried_bias = backoff_base, backoff_cap, tried_bias
        #: our own listen addresses and node id: never added, never selected
        self.own: set[str] = set()
        self.own_id: str | None = None
        #: what happened to incoming addresses, for metrics
        self.counters = dict.fromkeys(("added", "refreshed", "ignored", "dropped", "evicted", "demoted"), 0)
        self._anchors: list[str] = []
        self._entries: dict[str, AddressEntry] = {}
        self._new: dict[tuple[int, int], str] = {}
        self._tried: dict[tuple[int, int], str] = {}
        #: source group -> its new buckets (see _new_positions)
        self._group_buckets: dict[str, list[int]] = {}
        #: address -> ((failures, last_failure), retry time): select() asks for every entry
        self._retry_cache: dict[str, tuple[tuple[int, float], float]] = {}

    @classmethod
    def with_capacity(cls, capacity: int, secret: bytes | None = None, **kwargs: Any) -> AddressBook:
        """A book holding at most ``capacity`` entries, a fifth of them tried.

        ``AddressBook.with_capacity(1024)`` gives 26 new + 6 tried buckets of 32 slots.
        """
        return cls(secret, **layout_for(capacity), **kwargs)

    def __repr__(self) -> str:
        return f"<AddressBook new={self.new_count} tried={self.tried_count} capacity={self.capacity}>"

    # -- size and lookup ----------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, address: object) -> bool:
        return canonical_address(address) in self._entries

    def get(self, address: str) -> AddressEntry | None:
        """The entry for ``address`` (any spelling), or None."""
        key = canonical_address(address)
        return self._entries.get(key) if key else None

    def entries(self) -> list[AddressEntry]:
        """Every entry, in no particular order."""
        return list(self._entries.values())

    @property
    def new_count(self) -> int:
        """Entries in the *new* table (at most ``new_capacity``)."""
        return len(self._new)

    @property
    def tried_count(self) -> int:
        """Entries in the *tried* table (at most ``tried_capacity``)."""
        return len(self._tried)

    @property
    def anchors(self) -> list[str]:
        """Up to 2 addresses of outbound peers saved on a clean stop, to dial first next time."""
        return list(self._anchors)

    @anchors.setter
    def anchors(self, addresses: Collection[str]) -> None:
        canonical = [canonical_address(a) for a in addresses]
        self._anchors = [a for a in dict.fromkeys(canonical) if a][:MAX_ANCHORS]

    def set_own(self, addresses: Collection[str], node_id: str | None = None) -> None:
        """Record our own listen addresses and id; they are dropped from the book too."""
        self.own = {a for a in map(canonical_address, addresses) if a}
        self.own_id = node_id
        for entry in list(self._entries.values()):
            if entry.address in self.own or (node_id and entry.node_id == node_id):
                self._delete(entry)

    def restore(self, entries: Iterable[AddressEntry]) -> None:
        """Place saved entries under this book's layout and secret, best first (tried by last
        success, then new by last seen); an entry whose slot is taken goes to *new*, or is
        dropped. Entries already in the book, or for ourselves, are skipped."""
        entries = [e for e in entries if e.address not in self.own
                   and (e.node_id is None or e.node_id != self.own_id)]
        leftovers = []
        for entry in sorted((e for e in entries if e.tried), key=lambda e: -e.last_success):
            position = self._tried_position(entry)
            if position in self._tried:
                leftovers.append(entry)
            elif entry.address not in self._entries:
                self._put(entry, True, position)
        for entry in sorted([e for e in entries if not e.tried] + leftovers, key=lambda e: -e.last_seen):
            if entry.address in self._entries:
                continue
            free = [p for p in self._new_positions(entry.address, entry.source) if p not in self._new]
            if free:
                self._put(entry, False, free[0])

    # -- positions ------------------------------------------------------------------------

    def _hash(self, *parts: object) -> int:
        # keyed BLAKE2b: a MAC like HMAC-SHA256, at a third of the cost (it runs 12 times
        # for every new address)
        data = "\x1f".join(map(str, parts)).encode()
        return int.from_bytes(hashlib.blake2b(data, digest_size=8, key=self.secret).digest(), "big")

    def _new_positions(self, address: str, source: str) -> list[tuple[int, int]]:
        """The places ``address`` learned from group ``source`` may take, best first; all
        in the source group's own buckets, so a flood from one group stays confined.

        One keyed hash of the address gives each probe its sub-bucket (which of the source
        group's buckets) and its slot; the source group's buckets themselves are a keyed
        hash of (group, sub-bucket), remembered per group. An address that does not fit is
        offered again and again by gossip, so this is kept cheap."""
        digest = hashlib.blake2b(b"new\x1f" + address.encode(), digest_size=8 * NEW_PROBES,
                                 key=self.secret).digest()
        buckets = self._group_buckets.get(source)
        if buckets is None:
            if len(self._group_buckets) > 4096:
                self._group_buckets.clear()
            buckets = self._group_buckets[source] = [
                self._hash("new", source, sub) % self.new_buckets for sub in range(BUCKETS_PER_SOURCE_GROUP)]
        positions = []
        for probe in range(NEW_PROBES):
            value = int.from_bytes(digest[8 * probe:8 * probe + 8], "big")
            sub, rest = value % BUCKETS_PER_SOURCE_GROUP, value // BUCKETS_PER_SOURCE_GROUP
            positions.append((buckets[sub], rest % self.bucket_size))
        return positions

    def _new_position(self, address: str, source: str) -> tuple[int, int]:
        """The first place of :meth:`_new_positions`."""
        return self._new_positions(address, source)[0]

    def _free_new_position(self, address: str, source: str, now: float,
                           force: bool = False) -> tuple[int, int] | None:
        """A place for ``address`` in *new*: an empty one, else one whose occupant is
        terrible (evicted), else with ``force`` the first one (evicted); None otherwise."""
        positions = self._new_positions(address, source)
        for position in positions:
            if position not in self._new:
                return position
        for position in positions:
            if self._entries[self._new[position]].is_terrible(now):
                self._make_room(position, now, force=True)
                return position
        if force:
            self._make_room(positions[0], now, force=True)
            return positions[0]
        self.counters["dropped"] += 1
        return None

    def _tried_position(self, entry: AddressEntry) -> tuple[int, int]:
        sub = self._hash("tried-sub", entry.address) % BUCKETS_PER_ADDRESS_GROUP
        bucket = self._hash("tried", entry.group, sub) % self.tried_buckets
        return bucket, self._hash("tried-slot", bucket, entry.address) % self.bucket_size

    def _put(self, entry: AddressEntry, tried: bool, position: tuple[int, int]) -> None:
        entry.tried = tried
        entry.bucket, entry.slot = position
        (self._tried if tried else self._new)[position] = entry.address
        self._entries[entry.address] = entry

    def _unslot(self, entry: AddressEntry) -> None:
        del (self._tried if entry.tried else self._new)[(entry.bucket, entry.slot)]

    def _delete(self, entry: AddressEntry) -> None:
        self._unslot(entry)
        del self._entries[entry.address]

    def _make_room(self, position: tuple[int, int], now: float, force: bool) -> bool:
        """Free a new slot if it is empty, its occupant is terrible, or ``force``."""
        occupant = self._new.get(position)
        if occupant is not None:
            old = self._entries[occupant]
            if not force and not old.is_terrible(now):
                self.counters["dropped"] += 1
                return False
            self._delete(old)
            self.counters["evicted"] += 1
        return True

    # -- learning about addresses ---------------------------------------------------------

    def _usable(self, address: object, node_id: object) -> str | None:
        key = canonical_address(address)
        if key is None or key in self.own:
            return None
        if node_id is not None and (not is_node_id(node_id) or node_id == self.own_id):
            return None
        return key

    def add(self, address: str, node_id: str | None, source_host: str | None, now: float,
            seen: float | None = None) -> bool:
        """Learn of ``address`` from ``source_host`` (the socket IP that told us; None: ourselves).

        ``seen`` (default ``now``) is clamped to ``[0, now]`` so a peer cannot claim the
        future. A known address is refreshed (last seen, and node id unless tried) and
        never demoted. Invalid or own addresses and ids are ignored.

        :returns: True when a new entry was created
        """
        key = self._usable(address, node_id)
        if seen is not None and (isinstance(seen, bool) or not isinstance(seen, (int, float))
                                 or not math.isfinite(seen)):
            key = None
        if key is None:
            self.counters["ignored"] += 1
            return False
        seen = now if seen is None else min(max(float(seen), 0.0), now)
        entry = self._entries.get(key)
        if entry is not None:
            entry.last_seen = max(entry.last_seen, seen)
            if node_id is not None and not entry.tried and entry.node_id != node_id:
                entry.node_id = _shared_id(node_id)
            self.counters["refreshed"] += 1
            return False
        source = network_group(source_host) if source_host else network_group(_host(key))
        position = self._free_new_position(key, source, now)
        if position is None:
            return False
        self._put(AddressEntry(key, source, node_id=_shared_id(node_id), last_seen=seen), False, position)
        self.counters["added"] += 1
        return True

    def good(self, address: str, now: float, node_id: str | None = None) -> bool:
        """A completed outbound handshake with ``address``: move it to *tried*.

        Call it for outbound connections only: inbound peers' claimed addresses are not
        verified. An unknown address is added. When its tried slot is taken, the old tried
        entry goes back to *new* (evicting whatever holds its new slot).

        :returns: False when the address or id is invalid or our own
        """
        key = self._usable(address, node_id)
        if key is None:
            return False
        entry = self._entries.get(key)
        if entry is None:
            entry = AddressEntry(key, network_group(_host(key)))
        entry.last_success = now
        entry.last_seen = max(entry.last_seen, now)
        entry.failures = 0
        if node_id is not None:
            entry.node_id = _shared_id(node_id)
        if entry.tried:
            return True
        if entry.bucket >= 0:
            self._unslot(entry)
        position = self._tried_position(entry)
        occupant = self._tried.pop(position, None)
        if occupant is not None:
            old = self._entries[occupant]
            position_in_new = self._free_new_position(old.address, old.source, now, force=True)
            self._put(old, False, position_in_new)
            self.counters["demoted"] += 1
        self._put(entry, True, position)
        return True

    def attempt(self, address: str, now: float) -> bool:
        """A dial to ``address`` starts. False if unknown."""
        entry = self.get(address)
        if entry is None:
            return False
        entry.last_attempt = now
        entry.attempts += 1
        return True

    def evicted(self, address: str, now: float) -> bool:
        """The node at ``address`` evicted us (it is full): back off for ``EVICTED_BASE``
        seconds, doubling with each eviction up to ``EVICTED_CAP``; forgotten once it has
        not evicted us for ``EVICTED_CAP``. False if unknown."""
        entry = self.get(address)
        if entry is None:
            return False
        if now - entry.last_evicted > EVICTED_CAP:
            entry.evictions = 0
        entry.evictions += 1
        entry.last_evicted = now
        return True

    def failed(self, address: str, now: float) -> bool:
        """A dial to ``address`` failed: one more failure, and a longer backoff. False if unknown."""
        entry = self.get(address)
        if entry is None:
            return False
        entry.failures += 1
        entry.last_failure = now
        return True

    def remove(self, address: str) -> bool:
        """Forget ``address``. False if unknown."""
        entry = self.get(address)
        if entry is None:
            return False
        self._delete(entry)
        return True

    # -- choosing addresses ---------------------------------------------------------------

    def retry_at(self, address: str) -> float:
        """When ``address`` may be dialled again (0 without failures or when unknown)."""
        entry = self.get(address)
        return self._retry_at(entry) if entry else 0.0

    def _retry_at(self, entry: AddressEntry) -> float:
        if entry.evictions:
            # a node that evicts us is full: come back much later, later each time (a
            # completed handshake does not reset this, as it does failures)
            later = entry.last_evicted + backoff_delay(entry.evictions, EVICTED_BASE, EVICTED_CAP, 0.5)
            return max(later, self._failure_retry_at(entry))
        return self._failure_retry_at(entry)

    def _failure_retry_at(self, entry: AddressEntry) -> float:
        if not entry.failures:
            return 0.0
        key = (entry.failures, entry.last_failure)
        cached = self._retry_cache.get(entry.address)
        if cached is not None and cached[0] == key:
            return cached[1]
        draw = self._hash("backoff", entry.address, entry.failures) / 2.0 ** 64
        retry_at = entry.last_failure + backoff_delay(entry.failures, self.backoff_base, self.backoff_cap, draw)
        if len(self._retry_cache) > 2 * len(self._entries) + 64:
            self._retry_cache.clear()
        self._retry_cache[entry.address] = (key, retry_at)
        return retry_at

    def select(self, now: float, exclude: Collection[str] = (), exclude_ids: Collection[str] = (),
               is_banned: Callable[[str], bool] | None = None, rng: random.Random | None = None,
               avoid_groups: Collection[str] = ()) -> str | None:
        """An address to dial, or None when no entry qualifies.

        Never an address in ``exclude`` (connected or being dialled), a node id in
        ``exclude_ids``, a host for which ``is_banned(host)`` is true, our own address or id,
        or an address still backing off after failures. Draws from *tried* with chance
        ``tried_bias`` when both tables have candidates, then by :meth:`AddressEntry.chance`;
        entries in ``avoid_groups`` (groups we already have peers in) weigh 10 times less.
        """
        rng = rng or self.rng
        exclude = {canonical_address(a) for a in exclude}
        own, own_id = self.own, self.own_id

        def eligible(entry: AddressEntry) -> bool:
            return not (entry.address in exclude or entry.address in own
                        or (entry.node_id is not None and (entry.node_id in exclude_ids
                                                           or entry.node_id == own_id))
                        or self._retry_at(entry) > now
                        or (is_banned is not None and is_banned(entry.host)))

        new = self._candidates(list(self._new.values()), eligible, rng)
        tried = self._candidates(list(self._tried.values()), eligible, rng)
        if not new and not tried:
            return None
        pool = tried if tried and (not new or rng.random() < self.tried_bias) else new
        weights = [e.chance(now) * (0.1 if e.group in avoid_groups else 1.0) for e in pool]
        return rng.choices(pool, weights)[0].address

    def _candidates(self, addresses: list[str], eligible: Callable[[AddressEntry], bool],
                    rng: random.Random) -> list[AddressEntry]:
        """The eligible entries of one table: all of them in a small table; in a big one, the
        first ``SELECT_SAMPLE`` eligible among ``SELECT_PROBES`` drawn at random (weighting a
        uniform sample by chance draws nearly as weighting them all, for a fraction of the
        cost: a node dials often, and a swarm has thousands of nodes), and all of them again
        only when that sample holds none."""
        entries = self._entries
        if len(addresses) > SELECT_SCAN:
            picks = []
            for address in rng.sample(addresses, min(len(addresses), SELECT_PROBES)):
                entry = entries[address]
                if eligible(entry):
                    picks.append(entry)
                    if len(picks) >= SELECT_SAMPLE:
                        return picks
            if picks:
                return picks
        return [entries[a] for a in addresses if eligible(entries[a])]

    def sample(self, now: float, max_count: int = 1000, fraction: float = 0.25,
               fresh_within: float | None = None, rng: random.Random | None = None) -> list[AddressEntry]:
        """A random sample to answer ``getaddr``: at most ``max_count`` entries and at most
        ``ceil(fraction * len(book))``, skipping terrible ones (and, with ``fresh_within``,
        those unseen for that long). Tried and recently seen entries are more likely.
        """
        rng = rng or self.rng
        limit = min(max_count, math.ceil(fraction * len(self)))
        if limit <= 0:
            return []
        pool = [e for e in self._entries.values() if not e.is_terrible(now)
                and (fresh_within is None or now - e.last_seen <= fresh_within)]
        keyed = [(rng.random() ** (1.0 / self._sample_weight(e, now)), i) for i, e in enumerate(pool)]
        return [pool[i] for _, i in heapq.nlargest(limit, keyed)]

    @staticmethod
    def _sample_weight(entry: AddressEntry, now: float) -> float:
        age = now - entry.last_seen
        return (4.0 if entry.tried else 1.0) * (4.0 if age <= 3600 else 2.0 if age <= DAY else 1.0)

    def fresh(self, now: float, within: float = 600.0) -> list[AddressEntry]:
        """Entries seen in the last ``within`` seconds (worth relaying)."""
        return [e for e in self._entries.values() if now - within <= e.last_seen <= now + FUTURE_SLACK]
