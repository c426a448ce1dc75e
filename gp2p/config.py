"""Config: every tunable of a node with its default, validated once.

Also the pure helpers that parse ``host:port`` strings and listen specifications.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Iterable

__all__ = ["Config", "parse_address", "parse_listen", "format_address", "split_list"]

MiB = 1024 * 1024


def split_list(value: str | Iterable[str] | None) -> list[str]:
    """``"a,b"`` or ``["a", "b,c"]`` -> ``["a", "b", "c"]``; None -> ``[]``."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    out = []
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"expected an address string, got {item!r}")
        out.extend(part.strip() for part in item.split(",") if part.strip())
    return out


def _split_host(text: str) -> tuple[str, str]:
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"bad address {text!r}: expected [host]:port")
        return host, rest[1:]
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"bad address {text!r}: expected host:port")
    return host, port


def _port(text: str, original: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise ValueError(f"bad port in {original!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range in {original!r}")
    return port


def parse_address(text: str) -> tuple[str, int]:
    """``"127.0.0.1:7001"`` -> ``("127.0.0.1", 7001)``; ``"[::1]:7"`` works too."""
    if not isinstance(text, str):
        raise TypeError(f"expected 'host:port', got {text!r}")
    host, port = _split_host(text.strip())
    return host, _port(port, text)


def format_address(host: str, port: int) -> str:
    """The inverse of :func:`parse_address`."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_listen(text: str) -> tuple[str, list[int]]:
    """A listen spec -> (host, ports to try in order).

    ``host:7000``, ``host:0`` (any free port), ``host:7000-7100`` (a range, scanned for the
    first free port) or ``host:7000,7003,7010`` (a list, scanned in order).
    """
    host, spec = _split_host(text.strip())
    ports: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if "-" in part:
            lo_text, _, hi_text = part.partition("-")
            lo, hi = _port(lo_text, text), _port(hi_text, text)
            if lo > hi or lo == 0:
                raise ValueError(f"bad port range in {text!r}")
            ports.extend(range(lo, hi + 1))
        else:
            ports.append(_port(part, text))
    if not ports:
        raise ValueError(f"no port in {text!r}")
    return host, ports


@dataclass
class Config:
    """Every tunable of a :class:`~gp2p.Node`. Times are in seconds, sizes in bytes."""

    #: where to listen: ``host:port``, ``host:0``, ``host:7000-7100``, ``host:7000,7003``;
    #: None for a client-only node that only dials out
    listen: str | None = "127.0.0.1:0"
    #: the listen address told to peers, when it differs from the bound one (NAT, 0.0.0.0)
    advertise: str | None = None
    #: the local IP outbound sockets bind; default: the listen host when it is specific
    source_address: str | None = None
    #: seed addresses, dialled at start and again only while the node has no ready peer and
    #: nothing dialable in its address book
    bootstrap: list[str] = field(default_factory=list)
    #: addresses redialled with backoff and jitter for ever, on top of ``target_outbound``
    persistent_peers: list[str] = field(default_factory=list)
    #: nodes of different networks refuse each other in the handshake
    network_id: str = "gp2p-main"
    #: how often each side pings
    heartbeat_interval: float = 2.0
    #: a peer silent for this long is closed with TIMEOUT (at least 2 x heartbeat_interval)
    peer_timeout: float = 5.0
    #: the whole handshake: from accept (inbound), from the end of the TCP connect (outbound)
    handshake_timeout: float = 10.0
    #: how long a TCP connect may take
    connect_timeout: float = 5.0
    #: how long send() waits for room in a full out-queue; None: ``peer_timeout``
    send_timeout: float | None = None
    #: most ready inbound peers
    max_inbound: int = 125
    #: most inbound sockets still in their handshake
    max_pending: int = 64
    #: most inbound sockets from one remote IP
    max_per_ip: int = 8
    #: outbound connections the node keeps
    target_outbound: int = 8
    #: largest frame body accepted or sent
    max_frame_size: int = 4 * MiB
    #: worker greenlets that run handlers (1: strictly serial)
    handler_concurrency: int = 100
    #: inbound requests running at once per peer; more wait in the inbox
    max_requests_per_peer: int = 256
    #: how long broadcast ids are remembered
    seen_ttl: float = 120.0
    #: a broadcast is not forwarded past this many hops
    max_hops: int = 64
    #: directory for the key, the address book and the bans; None keeps nothing on disk
    datadir: str | None = None
    #: ``"msgpack"`` (default) or ``"json"``
    codec: str = "msgpack"
    #: bytes queued for one peer before senders wait (and frames we make close it)
    out_queue_bytes: int = 8 * MiB
    #: messages queued for one peer's handlers before its reader pauses
    inbox_size: int = 1000
    #: how long a closing peer may take to flush its last frames
    close_linger: float = 2.0
    #: free text sent in the hello
    agent: str = "gp2p"
    #: most addresses the address book holds
    max_addresses: int = 10240
    #: how long a protocol violation keeps an IP refused and undialled
    discourage_time: float = 600.0

    def __post_init__(self) -> None:
        self.bootstrap = split_list(self.bootstrap)
        self.persistent_peers = split_list(self.persistent_peers)
        for address in self.bootstrap + self.persistent_peers:
            parse_address(address)
        if self.listen is not None:
            parse_listen(self.listen)
        if self.advertise is not None:
            parse_address(self.advertise)
        if self.send_timeout is None:
            self.send_timeout = self.peer_timeout
            self._send_timeout_default = True
        self._check_numbers()
        if self.codec not in ("msgpack", "json"):
            raise ValueError(f"codec must be 'msgpack' or 'json', not {self.codec!r}")
        if not isinstance(self.network_id, str) or not self.network_id:
            raise ValueError("network_id must be a non-empty string")

    def _check_numbers(self) -> None:
        for name in ("heartbeat_interval", "peer_timeout", "handshake_timeout",
                     "connect_timeout", "send_timeout", "seen_ttl", "close_linger", "discourage_time"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")
        for name in ("max_inbound", "max_pending", "max_per_ip", "target_outbound",
                     "handler_concurrency", "max_requests_per_peer", "max_hops", "inbox_size",
                     "max_addresses"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name in ("max_inbound", "target_outbound") else 1):
                raise ValueError(f"{name} must be a positive integer")
        if self.peer_timeout < 2 * self.heartbeat_interval:
            raise ValueError("peer_timeout must be at least 2 x heartbeat_interval")
        if not 64 <= self.max_frame_size < 2**32:
            raise ValueError("max_frame_size must be between 64 bytes and 4 GiB")
        if self.max_addresses < 2:
            raise ValueError("max_addresses must be at least 2")
        if self.out_queue_bytes < self.max_frame_size + 4:
            raise ValueError("out_queue_bytes must hold at least one frame of max_frame_size")

    @classmethod
    def field_names(cls) -> list[str]:
        """Every field, in declaration order (the CLI makes a flag of each)."""
        return [f.name for f in fields(cls)]

    def replace(self, **changes: Any) -> "Config":
        """A copy with some fields changed, validated again.

        A ``send_timeout`` that was left to default keeps following ``peer_timeout``.
        """
        if getattr(self, "_send_timeout_default", False) and "send_timeout" not in changes:
            changes["send_timeout"] = None
        return dataclasses.replace(self, **changes)

    @property
    def source_host(self) -> str | None:
        """The IP outbound sockets bind: ``source_address``, else a specific listen host."""
        if self.source_address:
            return self.source_address
        if self.listen is None:
            return None
        host, _ = parse_listen(self.listen)
        return None if host in ("0.0.0.0", "::", "") else host
