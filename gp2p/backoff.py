"""Backoff: exponential redial delays with jitter (pure: the caller passes the random draw)."""
from __future__ import annotations

__all__ = ["backoff_delay"]


def backoff_delay(failures: int, base: float = 1.0, cap: float = 60.0, draw: float = 0.5) -> float:
    """Seconds to wait before the next attempt after ``failures`` consecutive failures.

    ``base * 2**(failures-1)`` capped at ``cap``, then scaled by a jitter factor between
    0.5 and 1.5 from ``draw`` (a number in [0, 1)), so that nodes that failed together do
    not retry together. No failure means no wait.
    """
    if failures <= 0:
        return 0.0
    delay = min(cap, base * 2 ** min(failures - 1, 32))
    return delay * (0.5 + draw)
