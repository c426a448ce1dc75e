"""Dispatcher: per-peer bounded inboxes served fairly by a fixed set of worker greenlets.

Each connection has an :class:`Inbox` of work items. Inboxes with work wait in one ready
queue; a worker takes an inbox, runs its oldest item, and puts the inbox back at the end
if more is waiting, so peers take turns message by message. Workers are long-lived and
never more than ``handler_concurrency`` (they are started as load first needs them, so an
idle node in a thousand-node swarm holds few). No greenlet is spawned per message.

Ordering: a peer's items *start* in the order they were submitted (a worker takes an item
and calls it without yielding in between). ``peer_connected`` is that peer's first item and
``peer_disconnected`` its last. When an inbox is full, only that peer's reader waits.
"""
from __future__ import annotations

import logging
from collections import deque
from typing import Any, Callable

from gevent.event import Event
from gevent.queue import Queue

from gp2p.messages import RESERVED_PREFIX
from gp2p.tasks import GroupClosed, TaskGroup

log = logging.getLogger(__name__)

__all__ = ["Dispatcher", "Context", "Handler", "EVENTS"]

EVENTS = ("peer_connected", "peer_disconnected")


class Context:
    """How a message arrived: ``via`` ("send", "broadcast" or "request"), ``origin`` (the
    node id that created it), ``msg_id`` and ``hops`` (broadcasts only, else None/0)."""

    __slots__ = ("via", "origin", "msg_id", "hops")

    def __init__(self, via: str, origin: str | None, msg_id: str | None = None, hops: int = 0):
        self.via = via
        self.origin = origin
        self.msg_id = msg_id
        self.hops = hops

    def __repr__(self) -> str:
        return f"<Context via={self.via} origin={(self.origin or '')[:8]} msg_id={self.msg_id} hops={self.hops}>"


class Handler:
    """A registered handler for one message kind."""

    __slots__ = ("kind", "fn", "context", "validate")

    def __init__(self, kind: str, fn: Callable, context: bool, validate: Callable | None):
        self.kind = kind
        self.fn = fn
        self.context = context
        self.validate = validate

    def __repr__(self) -> str:
        return f"<Handler {self.kind!r} -> {_describe(self.fn)}>"


def _describe(fn: Callable) -> str:
    module = getattr(fn, "__module__", None) or "?"
    return f"{module}.{getattr(fn, '__qualname__', repr(fn))}"


class Inbox:
    """One peer's queue of work items ``(fn, args)``."""

    __slots__ = ("peer", "items", "maxsize", "room", "scheduled", "requests", "blocked")

    def __init__(self, peer: Any, maxsize: int):
        self.peer = peer
        self.items: deque[tuple[Callable, tuple, bool]] = deque()
        self.maxsize = maxsize
        self.room = Event()
        self.scheduled = False
        #: inbound requests of this peer running now
        self.requests = 0
        #: a request waits at the head for one of the running ones to finish
        self.blocked = False


class Dispatcher:
    """Handler registry, event listeners, inboxes and workers."""

    def __init__(self, metrics: Any, concurrency: int = 100, inbox_size: int = 1000,
                 max_requests: int = 256):
        self.handlers: dict[str, Handler] = {}
        self.listeners: dict[str, list[Callable]] = {name: [] for name in EVENTS}
        self._tasks: TaskGroup | None = None
        self._metrics = metrics
        self._concurrency = concurrency
        self._inbox_size = inbox_size
        self._max_requests = max_requests
        #: our own deliveries (broadcasts we originate), with ``peer=None``
        self._local = Inbox(None, inbox_size)
        self._ready: Queue = Queue()
        self._workers = 0
        self._idle = 0
        self._busy = 0
        self._quiet = Event()
        self._quiet.set()

    def start(self, tasks: TaskGroup) -> None:
        """Run workers in ``tasks`` from now on (handlers may be registered before)."""
        self._tasks = tasks

    # -- registry ----------------------------------------------------------------------

    def on(self, kind: str, *, context: bool = False,
           validate: Callable[[Any, Any], bool] | None = None) -> Callable[[Callable], Callable]:
        """Decorator registering the handler of ``kind``; it returns the function unchanged."""
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"a message kind is a non-empty string, not {kind!r}")
        if kind.startswith(RESERVED_PREFIX):
            raise ValueError(f"kind {kind!r} uses the reserved prefix {RESERVED_PREFIX!r}")
        if validate is not None and not callable(validate):
            raise TypeError("validate must be callable")

        def register(fn: Callable) -> Callable:
            existing = self.handlers.get(kind)
            if existing is not None:
                raise ValueError(f"kind {kind!r} already has a handler: {_describe(existing.fn)}")
            self.handlers[kind] = Handler(kind, fn, context, validate)
            return fn

        return register

    def on_event(self, name: str) -> Callable[[Callable], Callable]:
        """Decorator adding a listener for ``name`` (see :data:`EVENTS`); many are allowed."""
        if name not in self.listeners:
            raise ValueError(f"unknown event {name!r}; known: {', '.join(EVENTS)}")

        def register(fn: Callable) -> Callable:
            self.listeners[name].append(fn)
            return fn

        return register

    # -- inboxes -----------------------------------------------------------------------

    def attach(self, peer: Any) -> None:
        """Give ``peer`` its inbox."""
        peer.inbox = Inbox(peer, self._inbox_size)

    def submit(self, peer: Any, fn: Callable, *args: Any) -> bool:
        """Queue ``fn(*args)`` on ``peer``'s inbox, waiting while it is full.

        Called from the peer's reader: waiting here is what pushes back on the sender. The
        wait suspends the peer's liveness deadline. False if the peer closed meanwhile.
        """
        return self._submit(peer, fn, args, False)

    def submit_request(self, peer: Any, fn: Callable, *args: Any) -> bool:
        """Like :meth:`submit`, for an inbound request: at most ``max_requests`` of one
        peer run at once; the next one (and what follows it) waits in the inbox."""
        return self._submit(peer, fn, args, True)

    def submit_local(self, fn: Callable, *args: Any) -> None:
        """Queue work of the node itself (its own broadcasts); never waits."""
        self._put(self._local, fn, args)

    def _submit(self, peer: Any, fn: Callable, args: tuple, is_request: bool) -> bool:
        inbox = peer.inbox
        if len(inbox.items) >= inbox.maxsize:
            self._metrics.inc("inbox_full")
            with peer.backpressure():
                while len(inbox.items) >= inbox.maxsize and not peer.closed:
                    inbox.room.clear()
                    inbox.room.wait()
            if peer.closed:
                return False
        self._put(inbox, fn, args, is_request)
        return True

    def submit_final(self, peer: Any, fn: Callable, *args: Any) -> None:
        """Queue the peer's last item (it may exceed the bound: the reader is gone)."""
        inbox = peer.inbox
        inbox.room.set()
        self._put(inbox, fn, args)

    def _put(self, inbox: Inbox, fn: Callable, args: tuple, is_request: bool = False) -> None:
        inbox.items.append((fn, args, is_request))
        self._quiet.clear()
        if not inbox.scheduled and not inbox.blocked:
            inbox.scheduled = True
            self._schedule(inbox)

    def _schedule(self, inbox: Inbox) -> None:
        """Put ``inbox`` in the ready queue, adding a worker if none is free to take it.

        Idle workers already woken for inboxes queued earlier are not free: one more is
        needed whenever the queue holds more inboxes than there are idle workers, or a
        handler blocking in every worker would stall the inboxes behind it.
        """
        self._ready.put(inbox)
        if (self._ready.qsize() > self._idle and self._workers < self._concurrency
                and self._tasks is not None):
            try:
                self._tasks.spawn(f"worker:{self._workers + 1}", self._work)
                self._workers += 1
            except GroupClosed:
                pass  # the node is stopping: what is queued now is dropped

    @property
    def pending(self) -> int:
        """Inboxes waiting for a worker plus items running."""
        return self._ready.qsize() + self._busy

    def close(self) -> None:
        """Let every worker finish once the queue ahead of it is done."""
        self._tasks = None  # no new workers from now on
        for _ in range(self._workers):
            self._ready.put(None)
        self._workers = 0

    def wait_quiet(self, timeout: float | None) -> bool:
        """Block until nothing is queued or running; False after ``timeout``."""
        return self._quiet.wait(timeout)

    def _work(self) -> None:
        ready = self._ready
        while True:
            self._idle += 1
            inbox = ready.get()
            self._idle -= 1
            if inbox is None:
                return
            items = inbox.items
            fn, args, is_request = items[0]
            if is_request and inbox.requests >= self._max_requests:
                inbox.scheduled = False  # back in the queue when a request finishes
                inbox.blocked = True
                continue
            items.popleft()
            if items:
                self._schedule(inbox)
            else:
                inbox.scheduled = False
            if len(items) < inbox.maxsize and not inbox.room.is_set():
                inbox.room.set()
            self._busy += 1
            if is_request:
                inbox.requests += 1
            try:
                fn(*args)
            except Exception:
                self._metrics.inc("handler_errors")
                log.exception("handler %s failed", _describe(fn))
            finally:
                self._busy -= 1
                if is_request:
                    self._request_done(inbox)
                if not self._busy and not ready.qsize():
                    self._quiet.set()

    def _request_done(self, inbox: Inbox) -> None:
        inbox.requests -= 1
        if inbox.blocked:
            inbox.blocked = False
            if inbox.items and not inbox.scheduled:
                inbox.scheduled = True
                self._schedule(inbox)

    # -- what workers run --------------------------------------------------------------

    def deliver(self, peer: Any, kind: str, payload: Any, ctx: Context) -> None:
        """Run the handler of ``kind`` (a worker item)."""
        handler = self.handlers.get(kind)
        if handler is None:
            self._metrics.inc("unhandled")
            log.debug("no handler for %r from %r", kind, peer)
            return
        if self.check(handler, peer, payload):
            self.call(handler, peer, payload, ctx)

    def check(self, handler: Handler, peer: Any, payload: Any) -> bool:
        """Run the kind's validation hook, if any; a rejection (False or an exception) is
        counted, and counted against the sending peer as misbehaviour."""
        if handler.validate is None:
            return True
        try:
            ok = bool(handler.validate(peer, payload))
        except Exception:
            log.debug("validator of %r raised", handler.kind, exc_info=True)
            ok = False
        if not ok:
            self._metrics.inc("rejected")
            if peer is not None:
                peer.misbehaviour += 1
        return ok

    def invoke(self, handler: Handler, peer: Any, payload: Any, ctx: Context) -> Any:
        """Call the handler and return its value; exceptions propagate."""
        self._metrics.inc("delivered")
        if handler.context:
            return handler.fn(peer, payload, ctx)
        return handler.fn(peer, payload)

    def call(self, handler: Handler, peer: Any, payload: Any, ctx: Context) -> None:
        """Call the handler; an exception is logged with the handler's name and counted."""
        try:
            self.invoke(handler, peer, payload, ctx)
        except Exception:
            self._metrics.inc("handler_errors")
            log.exception("handler %s of %r failed on a message from %r",
                          _describe(handler.fn), handler.kind, peer)

    def emit(self, name: str, *args: Any) -> None:
        """Call every listener of ``name`` (a worker item); one failing does not stop the rest."""
        for fn in list(self.listeners[name]):
            try:
                fn(*args)
            except Exception:
                self._metrics.inc("handler_errors")
                log.exception("%s listener %s failed", name, _describe(fn))
