"""The far end of ``gp2p bench``: raw framed echo and sink servers and gp2p nodes with the
bench handlers, in the bench's own process (``inproc``) or in a child (``twoproc``, started
as ``python -m gp2p.bench --serve``); and the raw framing both ends share."""
from __future__ import annotations

import json
import struct
import sys
import time
from typing import Any, Iterator

import gevent
from gevent import socket
from gevent.os import make_nonblocking, nb_read
from gevent.server import StreamServer

from gp2p.node import Node

__all__ = ["FarEnd", "serve", "FANOUT", "NODE_FIELDS"]

FANOUT = 10
NODE_FIELDS = {"heartbeat_interval": 30.0, "peer_timeout": 120.0, "network_id": "gp2p-bench",
               "target_outbound": 0}
SYNC_TIMEOUT = 60.0
RECV_SIZE = 65536

header = struct.Struct(">I")
count_struct = struct.Struct(">Q")


# -- raw framing ---------------------------------------------------------------------------


def frames(sock: socket.socket) -> Iterator[bytes]:
    """Frame bodies read from ``sock``; raises ConnectionError at EOF."""
    buf = bytearray()
    while True:
        chunk = sock.recv(RECV_SIZE)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
        pos, end = 0, len(buf)
        while end - pos >= 4:
            (n,) = header.unpack_from(buf, pos)
            if end - pos - 4 < n:
                break
            yield bytes(buf[pos + 4:pos + 4 + n])
            pos += 4 + n
        del buf[:pos]


def nodelay(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _serve_echo(sock: socket.socket, _addr: Any) -> None:
    nodelay(sock)
    try:
        for body in frames(sock):
            sock.sendall(header.pack(len(body)) + body)
    except OSError:
        pass


def _serve_sink(sock: socket.socket, _addr: Any) -> None:
    """Count frames; an empty frame asks for the count so far."""
    nodelay(sock)
    count = 0
    try:
        for body in frames(sock):
            if body:
                count += 1
            else:
                sock.sendall(header.pack(count_struct.size) + count_struct.pack(count))
    except OSError:
        pass


# -- the far end ---------------------------------------------------------------------------


def _install_handlers(node: Node) -> None:
    """``bench.echo`` returns its payload; ``bench.sink`` and ``bench.bcast`` count per
    sender; ``bench.count`` (payload n) answers once n were counted from the asker."""
    counts: dict[str, int] = {}

    @node.on("bench.echo")
    def echo(peer: Any, payload: Any) -> Any:
        return payload

    def sink(peer: Any, payload: Any) -> None:
        counts[peer.id] = counts.get(peer.id, 0) + 1

    node.on("bench.sink")(sink)
    node.on("bench.bcast")(sink)

    @node.on("bench.count")
    def count(peer: Any, expected: int) -> int:
        # handlers start in the order the messages were sent, so this normally returns at once
        deadline = time.monotonic() + SYNC_TIMEOUT
        while counts.get(peer.id, 0) < expected and time.monotonic() < deadline:
            gevent.sleep(0.001)
        return counts.get(peer.id, 0)

    @node.on_event("peer_disconnected")
    def forget(peer: Any, reason: Any) -> None:
        counts.pop(peer.id, None)


class FarEnd:
    """The far side of every figure, on ``prefix``.1 (raw echo and sink servers, one gp2p
    node) and ``prefix``.11-20 (the broadcast peers). Lives in the bench's own process
    (inproc) or in a child (twoproc)."""

    def __init__(self, prefix: str, codec: str = "msgpack"):
        self.prefix = prefix
        self.codec = codec
        self.servers: list[StreamServer] = []
        self.nodes: list[Node] = []

    def __repr__(self) -> str:
        return f"<FarEnd {self.prefix}.x servers={len(self.servers)} nodes={len(self.nodes)}>"

    def start(self) -> dict[str, Any]:
        """Start everything; return the addresses: echo, sink, node and fanout (a list)."""
        host = f"{self.prefix}.1"
        try:
            for handler in (_serve_echo, _serve_sink):
                server = StreamServer((host, 0), handler)
                server.start()
                self.servers.append(server)
            for host_id in [1] + list(range(11, 11 + FANOUT)):
                node = Node(listen=f"{self.prefix}.{host_id}:0", codec=self.codec, **NODE_FIELDS)
                _install_handlers(node)
                self.nodes.append(node)
                node.start()
        except BaseException:
            self.stop()
            raise
        echo, sink = (f"{s.server_host}:{s.server_port}" for s in self.servers)
        return {"echo": echo, "sink": sink, "node": self.nodes[0].address,
                "fanout": [node.address for node in self.nodes[1:]]}

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        for server in self.servers:
            server.stop()
        self.nodes, self.servers = [], []


def serve(prefix: str, codec: str) -> int:
    """The twoproc child: start a FarEnd, print its addresses, serve until stdin closes."""
    far = FarEnd(prefix, codec)
    addresses = far.start()
    try:
        sys.stdout.write(json.dumps(addresses) + "\n")  # the parent reads this one line
        sys.stdout.flush()
        fd = sys.stdin.fileno()
        make_nonblocking(fd)
        while nb_read(fd, 4096):
            pass
    finally:
        far.stop()
    return 0
