"""Dispatcher: per-peer bounded inboxes served fairly by a fixed set of worker greenlets.

Each connection has an :class:`Inbox` of work items. Inboxes with work wait in one ready
queue; a worker takes an inbox, runs its oldest item, and puts the inbox back at the end
if more is waiting, so peers take turns message by message. When no other inbox waits,
the worker goes on with the same inbox without the round trip through the queue, but only
as long as its handlers do not block: a callback of the hub, which runs only if one does,
hands the inbox to another worker then, so the next item need not wait for the blocked
one. Workers are long-lived and never more than ``handler_concurrency`` (they are started
as load first needs them, so an idle node in a thousand-node swarm holds few). No
greenlet is spawned per message.

Ordering: a peer's items *start* in the order they were submitted (a worker takes an item
and calls it without yielding in between). ``peer_connected`` is that peer's first item and
``peer_disconnected`` its last. When an inbox is full, only that peer's reader waits.
"""
from __future__ import annotations

import logging
from collections import deque
from typing import Any, Callable

import gevent
from gevent.event import Event
from gevent.hub import Waiter

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

    __slots__ = ("peer", "items", "maxsize", "room", "scheduled", "requests", "blocked", "server")

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
        #: the worker going on with this inbox after its current item, unless that blocks
        self.server: Any = None


class Dispatcher:
    """Handler registry, event listeners, inboxes and workers."""

    def __init__(self, metrics: Any, concurrency: int = 100, inbox_size: int = 1000,
                 max_requests: int = 256):
        self.handlers: dict[str, Handler] = {}
        self.listeners: dict[str, list[Callable]] = {name: [] for name in EVENTS}
        self._tasks: TaskGroup | None = None
        self._metrics = metrics
        self._counters = metrics.counters
        self._concurrency = concurrency
        self._inbox_size = inbox_size
        self._max_requests = max_requests
        #: our own deliveries (broadcasts we originate), with ``peer=None``
        self._local = Inbox(None, inbox_size)
        #: inboxes waiting for a worker, and the idle workers' waiters
        self._ready: deque[Inbox] = deque()
        self._sleepers: deque[Waiter] = deque()
        self._workers = 0
        #: workers running or handed an inbox (not idle)
        self._active = 0
        #: items running
        self._busy = 0
        self._quiet = Event()
        self._quiet.set()

    def start(self, tasks: TaskGroup) -> None:
        """Run workers in ``tasks`` from now on (handlers may be registered before)."""
        self._tasks = tasks
        self._loop = gevent.get_hub().loop

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
        inbox = peer.inbox
        if len(inbox.items) >= inbox.maxsize and not self._wait_for_room(peer, inbox):
            return False
        inbox.items.append((fn, args, False))
        self._quiet.clear()
        if not inbox.scheduled and not inbox.blocked:
            inbox.scheduled = True
            self._schedule(inbox)
        return True

    def submit_request(self, peer: Any, fn: Callable, *args: Any) -> bool:
        """Like :meth:`submit`, for an inbound request: at most ``max_requests`` of one
        peer run at once; the next one (and what follows it) waits in the inbox."""
        return self._submit(peer, fn, args, True)

    def submit_local(self, fn: Callable, *args: Any) -> None:
        """Queue work of the node itself (its own broadcasts); never waits."""
        self._put(self._local, fn, args)

    def _submit(self, peer: Any, fn: Callable, args: tuple, is_request: bool) -> bool:
        inbox = peer.inbox
        if len(inbox.items) >= inbox.maxsize and not self._wait_for_room(peer, inbox):
            return False
        inbox.items.append((fn, args, is_request))
        self._quiet.clear()
        if not inbox.scheduled and not inbox.blocked:
            inbox.scheduled = True
            self._schedule(inbox)
        return True

    def _wait_for_room(self, peer: Any, inbox: Inbox) -> bool:
        self._metrics.inc("inbox_full")
        with peer.backpressure():
            while len(inbox.items) >= inbox.maxsize and not peer.closed:
                inbox.room.clear()
                inbox.room.wait()
        return not peer.closed

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
        """Give ``inbox`` to an idle worker; with none, queue it and add a worker.

        A worker handed an inbox is no longer idle, even before it wakes: one more is
        needed whenever no idle one is left, or a handler blocking in every worker would
        stall the inboxes behind it. In the hub (a hand-off) the idle worker runs at once.
        """
        if self._sleepers:
            waiter = self._sleepers.popleft()
            self._active += 1
            if gevent.getcurrent() is waiter.hub:
                waiter.switch(inbox)
            else:
                self._loop.run_callback(waiter.switch, inbox)
            return
        self._ready.append(inbox)
        if self._workers < self._concurrency and self._tasks is not None:
            try:
                self._tasks.spawn(f"worker:{self._workers + 1}", self._work)
                self._workers += 1
                self._active += 1
            except GroupClosed:
                pass  # the node is stopping: what is queued now is dropped

    @property
    def pending(self) -> int:
        """Inboxes waiting for a worker plus items running."""
        return len(self._ready) + self._busy

    def close(self) -> None:
        """Let every worker finish once the queue ahead of it is done."""
        self._tasks = None  # no new workers from now on
        while self._sleepers:
            waiter = self._sleepers.popleft()
            self._loop.run_callback(waiter.switch, None)
        self._workers = 0

    def wait_quiet(self, timeout: float | None) -> bool:
        """Block until nothing is queued or running; False after ``timeout``."""
        return self._quiet.wait(timeout)

    def _work(self) -> None:
        ready = self._ready
        while True:
            if ready:
                inbox = ready.popleft()
            elif self._tasks is None:
                self._active -= 1
                return  # closed, and nothing left
            else:
                self._active -= 1
                if not self._active:
                    self._quiet.set()
                waiter = Waiter()
                self._sleepers.append(waiter)
                try:
                    inbox = waiter.get()
                finally:
                    if waiter in self._sleepers:  # killed while idle
                        self._sleepers.remove(waiter)
                if inbox is None:
                    return
            self._serve(inbox)

    def _serve(self, inbox: Inbox) -> None:
        """Run the inbox's next item; go on with the ones after it while no other inbox
        waits and the handlers do not block (see :meth:`_hand_off`)."""
        me = gevent.getcurrent()
        items = inbox.items
        ready = self._ready
        handoff = None
        try:
            while True:
                fn, args, is_request = items[0]
                if is_request and inbox.requests >= self._max_requests:
                    inbox.scheduled = False  # back in the queue when a request finishes
                    inbox.blocked = True
                    return
                items.popleft()
                if not inbox.room.is_set() and len(items) < inbox.maxsize:
                    inbox.room.set()
                if not items:
                    inbox.scheduled = False
                    inbox.server = None
                elif ready:
                    inbox.server = None
                    self._schedule(inbox)  # another inbox waits: take turns
                else:
                    inbox.server = me
                    if handoff is None:
                        handoff = self._loop.run_callback(self._hand_off, inbox, me)
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
                if inbox.server is not me:
                    return  # done with it, or it went to another worker while fn blocked
        finally:
            if inbox.server is me:
                inbox.server = None
            if handoff is not None:
                handoff.stop()

    def _hand_off(self, inbox: Inbox, worker: Any) -> None:
        """In the hub, hence only if ``worker`` yielded: its handler blocks, so the items
        after it go back in the queue for another worker."""
        if inbox.server is worker:
            inbox.server = None
            self._schedule(inbox)

    def _request_done(self, inbox: Inbox) -> None:
        inbox.requests -= 1
        if inbox.blocked:
            inbox.blocked = False
            if inbox.items and not inbox.scheduled:
                inbox.scheduled = True
                self._schedule(inbox)

    # -- what workers run --------------------------------------------------------------

    def deliver(self, peer: Any, kind: str, payload: Any, ctx: Context) -> None:
        """Run the handler of ``kind`` (a worker item): :meth:`check`, then :meth:`call`,
        written out because it runs for every message."""
        handler = self.handlers.get(kind)
        if handler is None:
            self._metrics.inc("unhandled")
            log.debug("no handler for %r from %r", kind, peer)
            return
        if handler.validate is not None and not self.check(handler, peer, payload):
            return
        self._counters["delivered"] += 1
        try:
            if handler.context:
                handler.fn(peer, payload, ctx)
            else:
                handler.fn(peer, payload)
        except Exception:
            self._metrics.inc("handler_errors")
            log.exception("handler %s of %r failed on a message from %r",
                          _describe(handler.fn), handler.kind, peer)

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
