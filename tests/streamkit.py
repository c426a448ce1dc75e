"""Helpers for the transport tests (``test_transport``, ``test_memnet``): a harness that closes
everything a test opened on one transport, and small stream readers and handlers."""
import gevent
from gevent.event import Event

from gp2p.testing import NodeFactory, assert_stopped_clean


class StreamEnv:
    """One transport, with hosts from ``hosts()``, and everything a test opened on it (streams,
    listeners, greenlets, nodes) closed and checked at the end."""

    def __init__(self, transport, hosts):
        self.transport = transport
        self.host = hosts
        self.nodes = NodeFactory(transport=transport)
        self.listeners = []
        self.streams = []
        self.greenlets = []

    def listen(self, handler, pool_size=16, host=None, port=0):
        listener = self.transport.listen(f"{host or self.host()}:{port}", handler, pool_size)
        self.listeners.append(listener)
        return listener

    def dial(self, address, source=None, timeout=3.0):
        stream = self.transport.dial(address, timeout, source or self.host())
        self.streams.append(stream)
        return stream

    def spawn(self, fn, *args):
        greenlet = gevent.spawn(fn, *args)
        self.greenlets.append(greenlet)
        return greenlet

    def node(self, host=None, **fields):
        return self.nodes.make(listen=f"{host or self.host()}:0", **fields)

    def close(self):
        gevent.killall(self.greenlets, timeout=5)
        heal = getattr(self.transport, "heal", None)
        if heal is not None:
            heal()  # bytes held by a partition would keep streams open
        for stream in self.streams:
            stream.close()
        for listener in self.listeners:
            listener.stop(timeout=1.0)
        nodes = list(self.nodes.nodes)
        self.nodes.stop_all()
        for node in nodes:
            assert_stopped_clean(node)
        stats = getattr(self.transport, "stats", None)
        if stats is not None:  # the in-memory network can say what is left
            left = stats()
            assert left["streams"] == 0 and left["listeners"] == 0 and left["links"] == 0, left


def read(stream, size=65536):
    """One ``recv_into`` (b"" at EOF)."""
    buf = bytearray(size)
    n = stream.recv_into(buf)
    return bytes(buf[:n])


def read_exactly(stream, size):
    """``size`` bytes, never more (what follows stays in the stream)."""
    data = bytearray()
    buf = bytearray(65536)
    while len(data) < size:
        n = stream.recv_into(memoryview(buf)[:min(len(buf), size - len(data))])
        assert n, f"EOF after {len(data)} of {size} bytes"
        data += buf[:n]
    return bytes(data)


def read_to_eof(stream):
    data = bytearray()
    buf = bytearray(65536)
    while True:
        n = stream.recv_into(buf)
        if not n:
            return bytes(data)
        data += buf[:n]


def echo(stream):
    buf = bytearray(65536)
    while True:
        n = stream.recv_into(buf)
        if not n:
            return
        stream.sendall(bytes(buf[:n]))


def accepted(env, handler=None, **kwargs):
    """A listener that keeps each accepted stream in a list and runs ``handler`` on it (by
    default, holds it open until the listener is stopped); the listener and the list."""
    streams = []

    def handle(stream):
        streams.append(stream)
        if handler is not None:
            handler(stream)
        else:
            Event().wait()

    return env.listen(handle, **kwargs), streams
