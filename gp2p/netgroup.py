"""Network groups: which addresses are likely run by the same operator (pure).

A network group is the /16 of an IPv4 address, the /32 of an IPv6 address, or the name
itself for a host name. The address book spreads entries by group, and the peer manager
prefers dialling groups it is not yet connected to. Tests fake distinct hosts with
127.x.y.z addresses, so 127.5.0.1 and 127.6.0.1 are different groups on purpose.
"""
from __future__ import annotations

import functools
import ipaddress
import re

from gp2p.config import format_address, parse_address

__all__ = ["network_group", "canonical_address"]

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@functools.lru_cache(maxsize=65536)
def network_group(host: str) -> str:
    """The network group of ``host``: ``"127.5.0.0/16"``, ``"2001:db8::/32"`` or the name.

    IPv4-mapped IPv6 addresses count as IPv4. Host names are lower-cased.
    """
    ip = _ip(host)
    if ip is None:
        return host.strip().lower().rstrip(".")
    if ip.version == 4:
        first, second = ip.packed[:2]
        return f"{first}.{second}.0.0/16"
    return f"{ipaddress.IPv6Address(ip.packed[:4] + bytes(12))}/32"


def _valid_hostname(host: str) -> bool:
    if not host or len(host) > 253:
        return False
    return all(_LABEL.match(label) for label in host.split("."))


def canonical_address(text: object) -> str | None:
    """``"host:port"`` in one spelling per endpoint, or None when it cannot be dialled.

    IP addresses are normalised (``[0:0::1]:7`` -> ``[::1]:7``), host names lower-cased.
    Port 0, unspecified (0.0.0.0, ::), multicast and malformed addresses give None.
    """
    if not isinstance(text, str) or len(text) > 300:
        return None
    return _canonical(text)


# every addr entry a node hears goes through here, and a swarm's nodes hear the same
# addresses over and over: parsing with ipaddress costs ~20 us, a cache hit ~0.1 us
@functools.lru_cache(maxsize=65536)
def _canonical(text: str) -> str | None:
    try:
        host, port = parse_address(text)
    except ValueError:
        return None
    if port == 0:
        return None
    ip = _ip(host)
    if ip is None:
        host = host.lower().rstrip(".")
        return format_address(host, port) if _valid_hostname(host) else None
    if ip.is_unspecified or ip.is_multicast:
        return None
    return format_address(str(ip), port)
