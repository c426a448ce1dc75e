"""Bench: gp2p against raw gevent sockets (placeholder until the measurement issue)."""
from __future__ import annotations

import sys
from typing import Any


def run_bench(args: Any) -> int:
    print("gp2p bench: not implemented yet", file=sys.stderr)
    return 2
