"""SeenCache: the bounded, time-limited set of broadcast ids a node has already handled.

Pure: no gevent, no clock of its own (``now`` is passed in, in wall-clock seconds, the same
clock as the origin timestamps of gossip frames).

An id must not be forgotten while a copy of its message can still be accepted. A copy is
accepted only while its origin timestamp ``ts`` lies in ``[now - ttl, now + ttl/2]``; an id
first seen at ``t`` had ``ts <= t + ttl/2``, so no copy of it is acceptable after
``t + 1.5 x ttl``, and entries are kept that long. Only capacity pressure evicts earlier,
and that is counted.
"""
from __future__ import annotations

from collections import OrderedDict

__all__ = ["SeenCache"]


class SeenCache:
    """Remembers ids for ``1.5 x ttl`` seconds, at most ``capacity`` of them."""

    def __init__(self, ttl: float = 120.0, capacity: int = 100_000):
        if ttl <= 0 or capacity <= 0:
            raise ValueError("ttl and capacity must be positive")
        self.ttl = ttl
        self.capacity = capacity
        self.keep = 1.5 * ttl
        self._expiry: OrderedDict[str, float] = OrderedDict()
        #: ids dropped before their time because the cache was full
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._expiry)

    def __contains__(self, msg_id: str) -> bool:
        return msg_id in self._expiry

    def acceptable(self, ts: float, now: float) -> bool:
        """True when a frame with origin timestamp ``ts`` may still be accepted at ``now``."""
        return now - self.ttl <= ts <= now + self.ttl / 2

    def add(self, msg_id: str, now: float) -> bool:
        """Record ``msg_id``; True if it was new, False if already seen."""
        expiry = self._expiry
        if msg_id in expiry:
            return False
        self._expire(now)
        if len(expiry) >= self.capacity:
            expiry.popitem(last=False)
            self.evicted += 1
        expiry[msg_id] = now + self.keep
        return True

    def _expire(self, now: float) -> None:
        expiry = self._expiry
        # insertion order is expiry order (``now`` only grows, give or take clock steps)
        while expiry:
            oldest, deadline = next(iter(expiry.items()))
            if deadline > now:
                break
            del expiry[oldest]
