"""Gossip: network-wide broadcast with de-duplication and a hop limit.

A broadcast frame carries (origin, id, hops, ts). A node delivers a message it has not seen
to its handler once and forwards it to every peer except the one it came from (and the
origin). Forwarding does not depend on a local handler. When the kind has a validation hook,
the message is forwarded only after the hook accepted it, so a rejected message stops at its
first hop. The origin's own handler runs once, with ``peer=None``.
"""
from __future__ import annotations

import logging
import os
import time
from collections import Counter
from typing import Any, Callable, Iterable

from gp2p.dispatch import Context, Dispatcher
from gp2p.errors import EncodeError, FrameTooLarge, PeerGone
from gp2p.seencache import SeenCache

log = logging.getLogger(__name__)

__all__ = ["Gossip"]

ID_BYTES = 16


class Gossip:
    """Broadcasts of one node: originating, receiving, forwarding, and their figures."""

    def __init__(self, node_id: str, config: Any, metrics: Any, dispatcher: Dispatcher,
                 peers: Callable[[], Iterable[Any]], encode: Callable[[dict], bytes],
                 clock: Callable[[], float] = time.time):
        self.node_id = node_id
        self.max_hops = config.max_hops
        self.seen = SeenCache(config.seen_ttl)
        self._metrics = metrics
        self._dispatcher = dispatcher
        self._peers = peers
        self._encode = encode
        self._clock = clock
        #: deliveries by hop count (0: our own broadcasts)
        self.hops = Counter()

    def __repr__(self) -> str:
        return f"<Gossip seen={len(self.seen)} delivered={sum(self.hops.values())}>"

    @property
    def hops_max(self) -> int:
        """The largest hop count a delivery had so far."""
        return max(self.hops) if self.hops else 0

    def broadcast(self, kind: str, payload: Any) -> str:
        """Send a new message to every peer and to our own handler; return its id.

        Waits (up to ``send_timeout`` per peer) for room in full out-queues; a peer that
        stays full is closed with SLOW_PEER and the broadcast goes on without it.
        """
        msg_id = os.urandom(ID_BYTES).hex()
        ts = self._clock()
        self.seen.add(msg_id, ts)
        data = self._encode({"type": "gossip", "origin": self.node_id, "id": msg_id, "hops": 1,
                             "ts": ts, "kind": kind, "payload": payload})
        for peer in list(self._peers()):
            try:
                peer.send_frame(data)
            except PeerGone:
                continue
        self._metrics.inc("gossip.originated")
        ctx = Context("broadcast", self.node_id, msg_id, 0)
        self._dispatcher.submit_local(self._deliver, None, kind, payload, ctx)
        return msg_id

    def on_frame(self, peer: Any, msg: dict) -> None:
        """A ``gossip`` frame from ``peer`` (called by its reader)."""
        now = self._clock()
        if not self.seen.acceptable(msg["ts"], now):
            self._metrics.inc("gossip.stale")
            return
        if not self.seen.add(msg["id"], now):
            self._metrics.inc("gossip.duplicates")
            return
        peer.last_useful = time.monotonic()
        handler = self._dispatcher.handlers.get(msg["kind"])
        if handler is not None and handler.validate is not None:
            self._dispatcher.submit(peer, self._validate_then_deliver, peer, msg)
            return
        self._forward(peer, msg)
        self._dispatcher.submit(peer, self._deliver, peer, msg["kind"], msg["payload"], _context(msg))

    def _validate_then_deliver(self, peer: Any, msg: dict) -> None:
        handler = self._dispatcher.handlers.get(msg["kind"])
        if handler is not None and not self._dispatcher.check(handler, peer, msg["payload"]):
            log.debug("broadcast %s from %r rejected by the validator of %r", msg["id"], peer, msg["kind"])
            return
        self._forward(peer, msg)
        self._deliver(peer, msg["kind"], msg["payload"], _context(msg))

    def _deliver(self, peer: Any, kind: str, payload: Any, ctx: Context) -> None:
        self.hops[ctx.hops] += 1
        self._metrics.inc("gossip.delivered")
        handler = self._dispatcher.handlers.get(kind)
        if handler is None:
            self._metrics.inc("unhandled")
            return
        self._dispatcher.call(handler, peer, payload, ctx)

    def _forward(self, source: Any, msg: dict) -> None:
        hops = msg["hops"]
        if hops >= self.max_hops:
            self._metrics.inc("gossip.hop_limit")
            return
        origin = msg["origin"]
        source_id = source.id
        targets = [peer for peer in self._peers() if peer.id != source_id and peer.id != origin]
        if not targets:
            return
        try:
            data = self._encode({**msg, "hops": hops + 1})
        except (EncodeError, FrameTooLarge) as exc:
            # our codec may not fit what the source's fitted (JSON grows bytes by a third);
            # the source broke no rule, so it is not blamed and we still deliver
            self._metrics.inc("gossip.unrelayable")
            log.info("broadcast %s cannot be relayed: %s", msg["id"], exc)
            return
        for peer in targets:
            peer.send_frame_nowait(data)
        self._metrics.inc("gossip.forwarded", len(targets))


def _context(msg: dict) -> Context:
    return Context("broadcast", msg["origin"], msg["id"], msg["hops"])
