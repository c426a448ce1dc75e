"""BanList: banned subnets and discouraged addresses, with expiry (pure; ``now`` passed in).

Manual bans (``node.ban``) cover an address or a subnet until a time and persist in
``datadir``. Discouragement is what a protocol violation earns an IP: the same effect
(refused inbound before the handshake, never dialled) for a shorter time, not persisted.
Times are wall-clock seconds, so saved bans keep their meaning across restarts.
"""
from __future__ import annotations

import ipaddress
import logging
from typing import Any

from gp2p import jsonfile

log = logging.getLogger(__name__)

__all__ = ["BanList", "parse_subnet", "BansCorrupt"]

FORMAT = "gp2p-bans"
VERSION = 1

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class BansCorrupt(jsonfile.CorruptFile):
    """The saved ban list is damaged."""


def parse_subnet(text: str) -> _Network:
    """``"127.0.0.5"``, ``"127.0.0.5:7001"``, ``"127.0.0.0/16"`` or ``"[::1]:7"`` -> a network."""
    text = text.strip()
    if "/" not in text:
        if text.startswith("[") and "]" in text:
            text = text[1:text.index("]")]
        elif text.count(":") == 1:
            text = text.rpartition(":")[0]
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"not an address or subnet: {text!r}") from None


class BanList:
    """Subnets banned until a time, plus discouraged single IPs."""

    def __init__(self) -> None:
        self._bans: dict[_Network, float] = {}
        self._discouraged: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"<BanList {len(self._bans)} bans {len(self._discouraged)} discouraged>"

    def __len__(self) -> int:
        """Bans and discouragements held (some may have expired and not been swept yet)."""
        return len(self._bans) + len(self._discouraged)

    def ban(self, target: str, seconds: float, now: float) -> _Network:
        """Ban ``target`` (an address or subnet) for ``seconds``; returns the network."""
        if not seconds > 0:
            raise ValueError("a ban lasts a positive number of seconds")
        network = parse_subnet(target)
        self._bans[network] = max(self._bans.get(network, 0.0), now + seconds)
        return network

    def unban(self, target: str) -> bool:
        """Lift the ban on exactly ``target``'s network (and any discouragement of it)."""
        network = parse_subnet(target)
        found = self._bans.pop(network, None) is not None
        if network.num_addresses == 1:
            found = self._discouraged.pop(str(network.network_address), None) is not None or found
        return found

    def discourage(self, ip: str, seconds: float, now: float) -> None:
        """Treat ``ip`` as banned for ``seconds`` (after a protocol violation)."""
        self._discouraged[ip] = max(self._discouraged.get(ip, 0.0), now + seconds)

    def is_banned(self, host: str, now: float) -> bool:
        """True when ``host`` (an IP) is banned or discouraged at ``now``."""
        until = self._discouraged.get(host)
        if until is not None:
            if until > now:
                return True
            del self._discouraged[host]
        if not self._bans:
            return False
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        for network, until in list(self._bans.items()):
            if until <= now:
                del self._bans[network]
            elif ip.version == network.version and ip in network:
                return True
        return False

    def banned(self, now: float) -> dict[str, float]:
        """Active manual bans: subnet text -> until (wall-clock seconds)."""
        for network, until in list(self._bans.items()):
            if until <= now:
                del self._bans[network]
        return {str(network): until for network, until in self._bans.items()}

    # -- persistence -------------------------------------------------------------------

    def save(self, path: str, now: float) -> None:
        """Write the active manual bans to ``path`` atomically (mode 0600)."""
        body = {"bans": self.banned(now)}
        jsonfile.write_atomic(path, jsonfile.dumps(FORMAT, VERSION, body).encode())

    def load(self, path: str, now: float) -> None:
        """Add the bans saved at ``path``; a missing file is no bans, a corrupt one is moved
        aside to ``<path>.bak`` with a warning."""
        try:
            body = jsonfile.loads(jsonfile.read_text(path, BansCorrupt), FORMAT, VERSION, BansCorrupt)
            bans = _check(body)
        except FileNotFoundError:
            return
        except BansCorrupt as exc:
            backup = jsonfile.quarantine(path)
            log.warning("ban list %s is corrupt (%s): moved it to %s", path, exc, backup)
            return
        for subnet, until in bans.items():
            if until > now:
                network = parse_subnet(subnet)
                self._bans[network] = max(self._bans.get(network, 0.0), until)


def _check(body: Any) -> dict[str, float]:
    bans = body.get("bans") if isinstance(body, dict) else None
    if not isinstance(bans, dict):
        raise BansCorrupt("no ban table")
    for subnet, until in bans.items():
        if not isinstance(until, (int, float)) or isinstance(until, bool):
            raise BansCorrupt(f"bad expiry for {subnet!r}")
        try:
            parse_subnet(subnet)
        except ValueError:
            raise BansCorrupt(f"bad subnet {subnet!r}") from None
    return bans
