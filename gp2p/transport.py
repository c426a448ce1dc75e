"""Transport: the only module that creates sockets.

Its interface is deliberately narrow, so that an in-memory transport can replace it:
``listen(spec, handler, pool_size) -> Listener`` and ``dial(address, timeout, source) ->
Stream``. A Stream has ``sendall``, ``recv_into``, ``shutdown`` (half-close), ``close``, ``abort`` and ``remote_ip``.
gevent's own socket module is used, so it is cooperative whether or not the application
monkey-patched the standard library.
"""
from __future__ import annotations

import errno
import logging
import socket as _stdsocket
import struct
from typing import Callable

import gevent
from gevent import socket
from gevent.pool import Pool
from gevent.server import StreamServer

from gp2p.config import format_address, parse_address, parse_listen

log = logging.getLogger(__name__)

__all__ = ["Stream", "Listener", "listen", "dial"]

BACKLOG = 1024


class Stream:
    """One connected TCP socket."""

    __slots__ = ("sock", "remote_ip", "remote_port", "local_address", "sendall", "recv_into")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        sock.setsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NODELAY, 1)
        remote = sock.getpeername()
        self.remote_ip: str = remote[0]
        self.remote_port: int = remote[1]
        local = sock.getsockname()
        self.local_address: str = format_address(local[0], local[1])
        self.sendall = sock.sendall
        self.recv_into = sock.recv_into

    def __repr__(self) -> str:
        return f"<Stream {self.local_address} -> {format_address(self.remote_ip, self.remote_port)}>"

    @property
    def remote_address(self) -> str:
        """``ip:port`` of the other end of this socket (not its listen address)."""
        return format_address(self.remote_ip, self.remote_port)

    def close(self) -> None:
        """Close the socket; safe to call twice."""
        self.sock.close()

    def shutdown(self) -> None:
        """Half-close: send FIN after what was written; reading still works."""
        self.sock.shutdown(_stdsocket.SHUT_WR)

    def abort(self) -> None:
        """Close with a TCP reset instead of a FIN (simulates a crash)."""
        try:
            self.sock.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.sock.close()


class Listener:
    """A listening server; ``address`` is the bound ``host:port``."""

    def __init__(self, server: StreamServer, address: str):
        self._server = server
        self.address = address

    def __repr__(self) -> str:
        return f"<Listener {self.address}>"

    def close(self) -> None:
        """Stop accepting; connections already accepted are left to their owners."""
        self._server.close()

    def stop(self, timeout: float = 1.0) -> None:
        """Stop accepting and kill handlers still running after ``timeout``."""
        self._server.stop(timeout=timeout)

    def abort(self) -> list:
        """Stop accepting and tell every handler to die, without waiting; return the
        handlers (to join)."""
        self._server.close()
        handlers = list(self._server.pool or ())
        gevent.killall(handlers, block=False)
        return handlers


def _literal_family(host: str) -> int | None:
    """AF_INET or AF_INET6 when ``host`` is an IP address literal, else None."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            _stdsocket.inet_pton(family, host)
        except OSError:
            continue
        return family
    return None


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def listen(spec: str, handler: Callable[[Stream], None], pool_size: int,
           on_error: Callable[[BaseException], None] | None = None) -> Listener:
    """Listen on the first free port of ``spec`` and call ``handler(stream)`` per socket.

    ``handler`` runs in a greenlet of a ``Pool(pool_size)``: when the pool is full the
    server stops accepting until a slot frees. The socket is closed when ``handler``
    returns, so it must run for the whole life of the connection.
    """
    host, ports = parse_listen(spec)
    sock = None
    last_error: OSError | None = None
    for port in ports:
        try:
            sock = _bind(host, port)
            break
        except OSError as exc:
            if exc.errno not in (errno.EADDRINUSE, errno.EACCES):
                raise
            last_error = exc
    if sock is None:
        raise OSError(errno.EADDRINUSE, f"no free port in {spec!r}: {last_error}")
    bound = sock.getsockname()
    address = format_address(bound[0], bound[1])

    def handle(client: socket.socket, _addr: tuple) -> None:
        gevent.getcurrent().name = f"listener:{address}:conn"
        try:
            stream = Stream(client)
        except OSError:  # reset between accept and getpeername
            client.close()
            return
        try:
            handler(stream)
        except gevent.GreenletExit:
            raise
        except Exception as exc:
            log.exception("inbound handler on %s failed", address)
            if on_error is not None:
                on_error(exc)
        finally:
            stream.close()

    server = StreamServer(sock, handle, spawn=Pool(pool_size))
    server.start()
    return Listener(server, address)


def dial(address: str, timeout: float, source: str | None = None) -> Stream:
    """Connect to ``address`` (``host:port``) from the local IP ``source``, if given."""
    host, port = parse_address(address)
    family = _literal_family(host)
    if family is None:
        sock = socket.create_connection((host, port), timeout=timeout,
                                        source_address=(source, 0) if source else None)
    else:
        # an IP literal needs no resolving: create_connection would still send it through
        # getaddrinfo, i.e. gevent's resolver thread pool, a queue that hundreds of
        # concurrent dials (a swarm) wait on for seconds
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            if source:
                sock.bind((source, 0))
            sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
    sock.settimeout(None)
    try:
        return Stream(sock)
    except BaseException:
        sock.close()
        raise
