"""Rpc: request / response over a peer connection.

Outgoing requests wait in one table, id -> (Waiter, peer). A response resolves its entry; no
answer in time raises :class:`RequestTimeout`; a peer that goes away fails its entries with
:class:`PeerGone` at once; answers that come too late are dropped and counted. (A gevent
``Waiter`` woken from a hub callback, and a bare timer, cost a fraction of an ``AsyncResult``
waited on under a ``Timeout``: this is every request's round trip.)
Incoming requests run their kind's handler in the dispatcher (at most
``max_requests_per_peer`` at once per peer; more wait in the inbox) and its return value, or
its exception's type and message, go back in a ``response``.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from gevent.hub import Waiter

from gp2p.dispatch import Context, Dispatcher
from gp2p.errors import EncodeError, PeerGone, ProtocolError, RemoteError, RequestTimeout
from gp2p.messages import check_payload

log = logging.getLogger(__name__)

__all__ = ["Rpc"]


class Rpc:
    """The request table of one node and the serving of requests it receives."""

    def __init__(self, metrics: Any, dispatcher: Dispatcher):
        self._metrics = metrics
        self._dispatcher = dispatcher
        self._pending: dict[int, tuple[Waiter, Any]] = {}
        self._next_id = 0

    def __repr__(self) -> str:
        return f"<Rpc {len(self._pending)} pending>"

    @property
    def pending(self) -> int:
        return len(self._pending)

    # -- asking ------------------------------------------------------------------------

    def request(self, peer: Any, kind: str, payload: Any, timeout: float) -> Any:
        """Send a request and wait for the answer (see :meth:`gp2p.Node.request`)."""
        self._next_id = (self._next_id + 1) % (2**64)
        request_id = self._next_id
        waiter = Waiter()
        self._pending[request_id] = (waiter, peer)
        deadline = time.monotonic() + timeout
        timer = None
        try:
            peer.send_message({"type": "request", "id": request_id, "kind": kind, "payload": payload},
                              timeout=timeout)
            timer = waiter.hub.loop.timer(max(0.0, deadline - time.monotonic()))
            timer.start(waiter.switch, _TIMED_OUT)
            ok, value = waiter.get()
        finally:
            self._pending.pop(request_id, None)
            if timer is not None:
                timer.close()
        if ok:
            return value
        if value is None:
            self._metrics.inc("rpc.timeouts")
            raise RequestTimeout(f"no answer to {kind!r} from {peer!r} within {timeout}s")
        raise value

    def on_response(self, peer: Any, msg: dict) -> None:
        """A ``response`` frame (called by the peer's reader)."""
        entry = self._pending.get(msg["id"])
        if entry is None or entry[1] is not peer:
            self._metrics.inc("rpc.late")
            log.debug("dropped a late or unknown response %s from %r", msg["id"], peer)
            return
        if msg["ok"]:
            _wake(entry[0], (True, msg.get("payload")))
        else:
            error = msg.get("error") or {"type": "RemoteError", "message": ""}
            _wake(entry[0], (False, RemoteError(error["type"], error["message"])))

    def peer_closed(self, peer: Any, reason: Any) -> None:
        """Fail every request waiting on ``peer``."""
        for waiter, target in list(self._pending.values()):
            if target is peer:
                _wake(waiter, (False, PeerGone(f"{peer!r} went away ({reason.name}) before answering")))

    # -- answering ---------------------------------------------------------------------

    def on_request(self, peer: Any, msg: dict) -> None:
        """A ``request`` frame: queue its handler in the peer's inbox."""
        self._dispatcher.submit_request(peer, self._serve, peer, msg)

    def _serve(self, peer: Any, msg: dict) -> None:
        kind = msg["kind"]
        handler = self._dispatcher.handlers.get(kind)
        if handler is None:
            self._metrics.inc("unhandled")
            return self._answer_error(peer, msg, "NoHandler", f"no handler for {kind!r}")
        if not self._dispatcher.check(handler, peer, msg["payload"]):
            return self._answer_error(peer, msg, "Rejected", f"the validator of {kind!r} refused it")
        ctx = Context("request", peer.id)
        try:
            value = self._dispatcher.invoke(handler, peer, msg["payload"], ctx)
        except Exception as exc:
            self._metrics.inc("handler_errors")
            log.info("request handler of %r raised %s: %s", kind, type(exc).__name__, exc)
            return self._answer_error(peer, msg, type(exc).__name__, str(exc))
        try:
            check_payload(value)
            peer.send_nowait({"type": "response", "id": msg["id"], "ok": True, "payload": value})
        except (EncodeError, ProtocolError) as exc:
            self._answer_error(peer, msg, "EncodeError", f"the answer cannot be sent: {exc}")

    def _answer_error(self, peer: Any, msg: dict, error_type: str, message: str) -> None:
        error = {"type": _sendable(error_type)[:200], "message": _sendable(message)[:1000]}
        peer.send_nowait({"type": "response", "id": msg["id"], "ok": False, "error": error})


#: what a request's timer wakes it with
_TIMED_OUT = (False, None)


def _wake(waiter: Waiter, outcome: tuple[bool, Any]) -> None:
    """Hand ``outcome`` to the greenlet waiting on ``waiter`` (from the hub, as a Waiter
    wants; the first outcome wins, later ones are dropped with the waiter)."""
    waiter.hub.loop.run_callback(waiter.switch, outcome)


def _sendable(text: str) -> str:
    """``text`` with lone surrogates (``surrogateescape``-decoded names, say) escaped, which
    no codec can encode: an error answer must always go out."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
