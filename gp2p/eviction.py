"""Eviction: which inbound peer makes room for a newcomer when inbound slots are full (pure).

Modelled on Bitcoin Core's rule, simplified: protect the peers an attacker can least fake
(the lowest round-trip times, those that most recently delivered useful messages, and the
longest-connected half of the rest); from what is left, take the network group with the
most peers and evict its most recent connection. Nothing left means nobody is evicted and
the newcomer is refused.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Hashable

__all__ = ["Candidate", "choose_eviction"]


@dataclass
class Candidate:
    """What eviction looks at in an inbound peer."""

    key: Hashable
    connected_at: float
    rtt: float | None
    last_useful: float | None
    group: str


def _protect(pool: list[Candidate], count: int, rank: Callable[[Candidate], Any]) -> list[Candidate]:
    """``pool`` without its ``count`` best members under ``rank`` (smallest first); members
    ranked None have nothing to be protected for."""
    ranked = [c for c in pool if rank(c) is not None]
    if count <= 0 or not ranked:
        return pool
    protected = {id(c) for c in sorted(ranked, key=rank)[:count]}
    return [c for c in pool if id(c) not in protected]


def choose_eviction(candidates: list[Candidate], per_class: int = 4) -> Hashable | None:
    """The key of the peer to evict, or None when every candidate is protected.

    ``per_class`` peers are protected for low RTT and as many for recent useful messages
    (at most a quarter of the candidates each, so small nodes still evict), then the
    longest-connected half of the rest.
    """
    pool = list(candidates)
    share = min(per_class, len(pool) // 4)
    pool = _protect(pool, share, lambda c: c.rtt)
    pool = _protect(pool, share, lambda c: -c.last_useful if c.last_useful is not None else None)
    pool = _protect(pool, len(pool) // 2, lambda c: c.connected_at)
    if not pool:
        return None
    sizes = Counter(c.group for c in pool)
    # the most represented group; among equals, the one with the newest connection
    newest = {}
    for c in pool:
        newest[c.group] = max(newest.get(c.group, -math.inf), c.connected_at)
    crowded = max(sizes, key=lambda g: (sizes[g], newest[g]))
    return max((c for c in pool if c.group == crowded), key=lambda c: c.connected_at).key
