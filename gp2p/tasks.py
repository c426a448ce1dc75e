"""TaskGroup: the one way gp2p starts greenlets.

A group names each greenlet (``node:ab12:peer:cd34:reader``), reports an unexpected
exception once to its owner, refuses new work once closing, and kills stragglers with a
log line naming each of them.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import gevent
from gevent.greenlet import Greenlet
from gevent.pool import Group

log = logging.getLogger(__name__)

__all__ = ["TaskGroup", "GroupClosed"]


class GroupClosed(RuntimeError):
    """Work was offered to a group that is closing."""


class TaskGroup:
    """Greenlets with one owner.

    :param name: prefix of every greenlet's name.
    :param on_error: called as ``on_error(greenlet, exception)`` when a greenlet dies of an
        exception other than :class:`gevent.GreenletExit`; by default it is only logged.
    """

    def __init__(self, name: str, on_error: Callable[[Greenlet, BaseException], None] | None = None):
        self.name = name
        self._on_error = on_error
        self._group = Group()
        self.closing = False

    def __repr__(self) -> str:
        state = "closing" if self.closing else "open"
        return f"<TaskGroup {self.name} {state} {len(self._group)} running>"

    def __len__(self) -> int:
        return len(self._group)

    def spawn(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Greenlet:
        """Start ``fn(*args, **kwargs)`` in a greenlet named ``<group>:<name>``."""
        if self.closing:
            raise GroupClosed(f"{self.name} is closing; refused {name}")
        greenlet = Greenlet(fn, *args, **kwargs)
        greenlet.name = f"{self.name}:{name}"
        greenlet.link_exception(self._failed)
        self._group.start(greenlet)
        return greenlet

    def spawn_later(self, seconds: float, name: str, fn: Callable[..., Any], *args: Any) -> Greenlet:
        """Like :meth:`spawn`, starting after ``seconds``."""
        if self.closing:
            raise GroupClosed(f"{self.name} is closing; refused {name}")
        greenlet = Greenlet(fn, *args)
        greenlet.name = f"{self.name}:{name}"
        greenlet.link_exception(self._failed)
        self._group.add(greenlet)
        greenlet.start_later(seconds)
        return greenlet

    def _failed(self, greenlet: Greenlet) -> None:
        exc = greenlet.exception
        log.error("greenlet %s died: %r", greenlet.name, exc, exc_info=(type(exc), exc, exc.__traceback__))
        if self._on_error is not None:
            self._on_error(greenlet, exc)

    def close(self) -> None:
        """Refuse new work from now on."""
        self.closing = True

    def join(self, timeout: float | None = None) -> bool:
        """Wait for every other greenlet to finish; True when none is left.

        The calling greenlet, if it belongs to the group, is not waited for.
        """
        current = gevent.getcurrent()
        others = [g for g in list(self._group) if g is not current]
        if not others:
            return True
        gevent.joinall(others, timeout=timeout)
        return all(g.dead for g in others)

    def kill(self, timeout: float | None = 1.0, quiet: bool = False, block: bool = True) -> list[Greenlet]:
        """Close the group and kill what still runs, logging each one by name; return the
        greenlets killed. With ``block=False`` the kills are only scheduled (the caller
        joins them), so that many groups can be killed in one pass of the hub."""
        self.closing = True
        current = gevent.getcurrent()
        victims = [g for g in list(self._group) if g is not current and not g.dead]
        for greenlet in victims:
            if not quiet:
                log.debug("killing %s", greenlet.name)
        if not victims:
            return victims
        if not block:
            gevent.killall(victims, block=False)
            return victims
        try:
            gevent.killall(victims, block=True, timeout=timeout)
        except gevent.Timeout:  # killall raises when they outlive ``timeout``
            pass
        for greenlet in victims:
            if not greenlet.dead:
                log.warning("greenlet %s did not die when killed", greenlet.name)
        return victims

    def stop(self, timeout: float) -> None:
        """Close, wait up to ``timeout`` for the greenlets to end, then kill the rest."""
        self.closing = True
        if not self.join(timeout):
            for greenlet in list(self._group):
                if not greenlet.dead and greenlet is not gevent.getcurrent():
                    log.warning("killing straggler %s", greenlet.name)
            self.kill(timeout=timeout, quiet=True)
