"""The public test kit: a node factory, ``wait_until``, a raw peer, error and leak checks.

Usable from any test framework; gp2p's own pytest fixtures are thin wrappers around it.
Nothing here patches gevent.
"""
from __future__ import annotations

import gc
import itertools
import os
import signal
import sys
import time
from typing import Any, Callable, Iterator

import gevent
from gevent import socket, subprocess
from gevent.greenlet import Greenlet

from gp2p import handshake, transport
from gp2p.codec import by_name
from gp2p.errors import DisconnectReason
from gp2p.identity import Identity
from gp2p.node import Node
from gp2p.tasks import TaskGroup
from gp2p.wire import FrameReader, frame, preamble

__all__ = ["wait_until", "hosts", "NodeFactory", "RawPeer", "NodeProcess", "alive_greenlets",
           "open_sockets", "HubErrors"]


def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.005,
               message: str = "") -> Any:
    """Poll ``predicate`` cooperatively until it is truthy; return its value.

    Raises :class:`AssertionError` after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(message or f"condition not met within {timeout}s: {predicate}")
        gevent.sleep(interval)


_host_counter = itertools.count(1)


def hosts() -> Iterator[str]:
    """Fresh loopback addresses 127.0.0.2, 127.0.0.3, ... 127.0.1.0, ... (one per node)."""
    for n in _host_counter:
        b, c = divmod(n, 254)
        yield f"127.{(b // 254) % 254}.{b % 254}.{c + 1}"


_hosts = hosts()


def next_host() -> str:
    """The next unused loopback address of this process."""
    return next(_hosts)


def alive_greenlets(prefix: str = "") -> list[Greenlet]:
    """Greenlets still alive whose name starts with ``prefix`` (all, by default)."""
    found = []
    for obj in gc.get_objects():
        if isinstance(obj, Greenlet) and not obj.dead:
            if obj.name.startswith(prefix):
                found.append(obj)
    return found


def open_sockets(host: str) -> list[Any]:
    """gevent sockets still open whose local address is ``host``."""
    found = []
    for obj in gc.get_objects():
        if isinstance(obj, socket.socket):
            try:
                if obj.fileno() != -1 and obj.getsockname()[0] == host:
                    found.append(obj)
            except OSError:
                continue
    return found


class HubErrors:
    """Records every error the gevent hub is told about (greenlets that died of an
    exception); :meth:`check` fails if there was any."""

    def __init__(self) -> None:
        self.errors: list[tuple] = []
        self._hub = gevent.get_hub()
        self._original = None

    def __enter__(self) -> "HubErrors":
        self._original = self._hub.handle_error

        def handle_error(context: Any, etype: Any, value: Any, tb: Any) -> None:
            if etype is not None and not issubclass(etype, gevent.GreenletExit):
                self.errors.append((context, etype, value))
            self._original(context, etype, value, tb)

        self._hub.handle_error = handle_error
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hub.handle_error = self._original

    def check(self) -> None:
        if self.errors:
            lines = [f"{getattr(c, 'name', c)}: {t.__name__}: {v}" for c, t, v in self.errors]
            raise AssertionError("background greenlets failed:\n" + "\n".join(lines))


class NodeFactory:
    """Starts nodes on fresh loopback addresses and stops them all at the end.

    ``make(**config)`` returns a started node listening on its own 127.x.y.z; its outbound
    sockets come from that address too. ``stop_all()`` stops every node and checks that no
    greenlet or socket of any of them is left. ``transport`` (e.g. a
    :class:`gp2p.memnet.MemoryNetwork`) is given to every node; TCP by default.
    """

    #: fast timers; ``target_outbound=0`` keeps each test's topology exactly as it builds
    #: it (pass ``target_outbound`` to let nodes dial addresses they discover)
    defaults = {"heartbeat_interval": 0.5, "peer_timeout": 2.0, "handshake_timeout": 3.0,
                "connect_timeout": 2.0, "target_outbound": 0}

    def __init__(self, transport: Any = None, **defaults: Any):
        self.defaults = {**self.defaults, **defaults}
        self.transport = transport
        self.nodes: list[Node] = []

    def make(self, start: bool = True, **fields: Any) -> Node:
        fields = {**self.defaults, **fields}
        fields.setdefault("listen", f"{next_host()}:0")
        node = Node(transport=self.transport, **fields)
        self.nodes.append(node)
        if start:
            node.start()
        return node

    def stop_all(self, check_leaks: bool = True) -> None:
        for node in self.nodes:
            node.stop()
        if check_leaks:
            for node in self.nodes:
                assert_stopped_clean(node)
        self.nodes.clear()


def assert_stopped_clean(node: Node) -> None:
    """Fail if a greenlet or a socket of a stopped ``node`` is still there."""
    assert node.closed, f"{node!r} is not stopped"
    prefixes = []
    if node.tasks is not None:
        prefixes.append(node.tasks.name)
    if node.address:
        prefixes.append(f"listener:{node.address}")
    left = [g for p in prefixes for g in alive_greenlets(p)]
    assert not left, f"greenlets left after stop: {[g.name for g in left]}"
    if node.config.listen:
        host = node.config.listen.rpartition(":")[0]
        if host not in ("0.0.0.0", "127.0.0.1", "::", ""):
            gc.collect()
            sockets = open_sockets(host)
            assert not sockets, f"sockets left after stop: {sockets}"


class RawPeer:
    """A hand-driven connection, for feeding a node exactly the bytes a test wants.

    ``RawPeer.dial(address)`` opens a TCP connection only; :meth:`handshake` then runs the
    dialer's side of the real handshake with a fresh identity.
    """

    def __init__(self, stream: Any, source: str, codec: str = "msgpack", network_id: str = "gp2p-main"):
        self.stream = stream
        self.source = source
        self.identity = Identity()
        self.local = handshake.Local(identity=self.identity, network_id=network_id,
                                     codec=by_name(codec), max_frame_size=16 * 1024 * 1024)
        self.reader = FrameReader(stream, 16 * 1024 * 1024)
        self.remote_codec = by_name(codec)
        self.info: handshake.PeerInfo | None = None

    @classmethod
    def dial(cls, address: str, source: str | None = None, **kwargs: Any) -> "RawPeer":
        source = source or next_host()
        return cls(transport.dial(address, 3.0, source), source, **kwargs)

    def handshake(self) -> "RawPeer":
        self.info, self.reader = handshake.outbound(self.stream, self.local)
        self.remote_codec = self.info.codec
        return self

    def send_bytes(self, data: bytes) -> None:
        self.stream.sendall(data)

    def send_preamble(self) -> None:
        self.stream.sendall(preamble(self.local.codec.id))

    def send(self, msg: dict) -> None:
        """Encode and frame ``msg`` with this peer's codec and send it."""
        self.stream.sendall(frame(self.local.codec.encode(msg), 16 * 1024 * 1024))

    def recv(self, timeout: float = 5.0) -> dict:
        """The next decoded message; raises :class:`gevent.Timeout` after ``timeout``."""
        with gevent.Timeout(timeout):
            return self.remote_codec.decode(self.reader.read_frame())

    def recv_until(self, predicate: Callable[[dict], bool], timeout: float = 5.0) -> tuple[dict, list[dict]]:
        """Read until a message matches; return it and everything read before it."""
        before = []
        with gevent.Timeout(timeout):
            while True:
                msg = self.remote_codec.decode(self.reader.read_frame())
                if predicate(msg):
                    return msg, before
                before.append(msg)

    def recv_raw(self, timeout: float = 5.0) -> bytes:
        """Whatever bytes arrive next (b"" at EOF)."""
        buf = bytearray(65536)
        with gevent.Timeout(timeout):
            n = self.stream.recv_into(buf)
        return bytes(buf[:n])

    def wait_closed(self, timeout: float = 5.0) -> bytes:
        """Read until EOF or reset; return every byte received before it."""
        data = bytearray()
        buf = bytearray(65536)
        with gevent.Timeout(timeout):
            while True:
                try:
                    n = self.stream.recv_into(buf)
                except ConnectionResetError:
                    return bytes(data)
                if not n:
                    return bytes(data)
                data += buf[:n]

    def close(self) -> None:
        self.stream.close()


def disconnect_reason(msg: dict) -> DisconnectReason | None:
    """The reason of a decoded ``disconnect`` message, else None."""
    if isinstance(msg, dict) and msg.get("type") == "disconnect":
        return DisconnectReason.from_wire(msg["reason"])
    return None


def fd_count() -> int:
    """Open file descriptors of this process (Linux)."""
    return len(os.listdir("/proc/self/fd"))


class NodeProcess:
    """``gp2p node ARGS`` in a child process: its ``<id> <address>`` line is read at once
    (``id``, ``address``), and its stderr is collected line by line in ``stderr_lines``.

    ``env`` and ``cwd`` are passed to the child (e.g. a ``PYTHONPATH`` for a source tree).
    """

    def __init__(self, *args: str, env: dict | None = None, cwd: str | None = None,
                 timeout: float = 30.0):
        self.proc = subprocess.Popen([sys.executable, "-m", "gp2p", "node", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
        self.stderr_lines: list[str] = []
        self._tasks = TaskGroup(f"node-process:{self.proc.pid}")
        self._drain = self._tasks.spawn("stderr", self._read_stderr)
        try:
            with gevent.Timeout(timeout, AssertionError("the node printed no '<id> <address>' line")):
                line = self.proc.stdout.readline()
            if not line:
                raise AssertionError("the node exited before listening:\n" + self.stderr())
        except BaseException:
            self.kill()
            raise
        self.id, self.address = line.split()

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            self.stderr_lines.append(line)

    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    def wait_log(self, text: str, timeout: float = 20.0) -> None:
        """Wait for a stderr line containing ``text``."""
        wait_until(lambda: any(text in line for line in self.stderr_lines), timeout,
                   message=f"no log line with {text!r}:\n{self.stderr()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Send ``sig``, then wait for the exit and all of stderr; the exit code."""
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=timeout)
        self._drain.join(timeout=5)
        return code

    def kill(self) -> None:
        """Kill the child if it still runs (for cleanup)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._tasks.kill(quiet=True)
