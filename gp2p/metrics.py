"""Metrics: plain counters and gauges, with no I/O (a status endpoint reads them)."""
from __future__ import annotations

from collections import Counter
from typing import Callable

__all__ = ["Metrics"]


class Metrics:
    """Named counters (only go up) and gauges (read from a callable when asked)."""

    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()
        self._gauges: dict[str, Callable[[], float]] = {}

    def __repr__(self) -> str:
        return f"<Metrics {len(self.counters)} counters>"

    def inc(self, name: str, amount: int = 1) -> None:
        """Add ``amount`` to counter ``name``."""
        self.counters[name] += amount

    def __getitem__(self, name: str) -> int:
        return self.counters[name]

    def gauge(self, name: str, read: Callable[[], float]) -> None:
        """Register a gauge whose value is ``read()`` at snapshot time."""
        self._gauges[name] = read

    def snapshot(self) -> dict[str, float]:
        """Every counter and gauge, by name."""
        out: dict[str, float] = dict(self.counters)
        for name, read in self._gauges.items():
            out[name] = read()
        return out
