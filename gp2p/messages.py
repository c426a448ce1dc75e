"""Every message type and its fields, in one place, and ``validate()`` at the edge.

A message is a map with a ``type`` string and the fields of that type. The reader decodes
a frame and calls :func:`validate`; nothing malformed gets further than that.
"""
from __future__ import annotations

from typing import Any, Callable

from gp2p.errors import EncodeError, ProtocolError
from gp2p.identity import SIGNATURE_SIZE, is_node_id

__all__ = ["validate", "check_outgoing", "check_payload", "KNOWN_TYPES", "HANDSHAKE_TYPES",
           "NONCE_SIZE", "MAX_ADDR_ENTRIES", "RESERVED_PREFIX"]

NONCE_SIZE = 32
MAX_ADDR_ENTRIES = 1000
MAX_NAME = 256
U64 = 2**64
#: application kinds may not start with this
RESERVED_PREFIX = "gp2p."


def _short_str(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= MAX_NAME


def _nonempty_str(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_NAME


def _opt_str(value: Any) -> bool:
    return value is None or _short_str(value)


def _u64(value: Any) -> bool:
    return type(value) is int and 0 <= value < U64


def _number(value: Any) -> bool:
    return type(value) in (int, float)


def _nonce(value: Any) -> bool:
    return isinstance(value, bytes) and len(value) == NONCE_SIZE


def _signature(value: Any) -> bool:
    return isinstance(value, bytes) and len(value) == SIGNATURE_SIZE


def _features(value: Any) -> bool:
    return isinstance(value, list) and len(value) <= 64 and all(_short_str(v) for v in value)


def _any(value: Any) -> bool:
    return True


def _addr_list(value: Any) -> bool:
    # entries are checked one by one by discovery, so that good ones survive bad ones
    return isinstance(value, list) and len(value) <= MAX_ADDR_ENTRIES


def _error(value: Any) -> bool:
    return (isinstance(value, dict) and _short_str(value.get("type"))
            and isinstance(value.get("message"), str))


_Check = Callable[[Any], bool]

#: type -> {field: check}; optional fields are listed in _OPTIONAL
SCHEMAS: dict[str, dict[str, _Check]] = {
    "hello": {"network": _nonempty_str, "id": is_node_id, "listen": _opt_str, "agent": _short_str,
              "features": _features, "nonce": _nonce, "ts": _number},
    "ack": {"sig": _signature},
    "ping": {"nonce": _u64},
    "pong": {"nonce": _u64},
    "disconnect": {"reason": _u64},
    "msg": {"kind": _nonempty_str, "payload": _any},
    "getaddr": {},
    "addr": {"addrs": _addr_list},
    "gossip": {"origin": is_node_id, "id": _nonempty_str, "hops": _u64, "ts": _number,
               "kind": _nonempty_str, "payload": _any},
    "request": {"id": _u64, "kind": _nonempty_str, "payload": _any},
    "response": {"id": _u64, "ok": lambda v: type(v) is bool},
}
_OPTIONAL: dict[str, dict[str, _Check]] = {
    "disconnect": {"text": _short_str},
    "addr": {"reply": lambda v: type(v) is bool},
    "response": {"payload": _any, "error": _error},
}

KNOWN_TYPES = frozenset(SCHEMAS)
HANDSHAKE_TYPES = frozenset(("hello", "ack", "disconnect"))


#: type -> (fields that need only be present, (field, check) pairs, optional ones or None),
#: so that validate() calls no check for payloads, which may be anything
_SPECS: dict[str, tuple[tuple[str, ...], tuple[tuple[str, _Check], ...], dict[str, _Check] | None]] = {
    mtype: (tuple(name for name, check in schema.items() if check is _any),
            tuple((name, check) for name, check in schema.items() if check is not _any),
            _OPTIONAL.get(mtype))
    for mtype, schema in SCHEMAS.items()
}
_MISSING = object()


def validate(msg: Any) -> str:
    """Check a decoded message; return its type.

    Raises :class:`ProtocolError` for anything that is not a map with a string ``type``, or
    a known type with a missing or ill-typed field. An unknown type is returned as it is
    (the caller ignores and counts it: forward compatibility).
    """
    if not isinstance(msg, dict):
        raise ProtocolError("a message must be a map")
    mtype = msg.get("type")
    if mtype == "msg":  # most of the traffic: checked without a loop (else as below)
        kind = msg.get("kind")
        if isinstance(kind, str) and 0 < len(kind) <= MAX_NAME and "payload" in msg:
            return mtype
    elif mtype == "gossip":
        kind, msg_id, hops, ts = msg.get("kind"), msg.get("id"), msg.get("hops"), msg.get("ts")
        if (isinstance(kind, str) and 0 < len(kind) <= MAX_NAME and isinstance(msg_id, str)
                and 0 < len(msg_id) <= MAX_NAME and type(hops) is int and 0 <= hops < U64
                and type(ts) in (int, float) and "payload" in msg and is_node_id(msg.get("origin"))):
            return mtype
    elif mtype == "request":
        kind, request_id = msg.get("kind"), msg.get("id")
        if (isinstance(kind, str) and 0 < len(kind) <= MAX_NAME and type(request_id) is int
                and 0 <= request_id < U64 and "payload" in msg):
            return mtype
    elif mtype == "response":
        request_id = msg.get("id")
        if (type(request_id) is int and 0 <= request_id < U64 and type(msg.get("ok")) is bool
                and "error" not in msg):
            return mtype
    if not isinstance(mtype, str) or not 0 < len(mtype) <= MAX_NAME:
        raise ProtocolError("a message needs a string 'type'")
    spec = _SPECS.get(mtype)
    if spec is None:
        return mtype
    present, checks, optional = spec
    for name in present:
        if name not in msg:
            raise ProtocolError(f"{mtype}: missing or bad field {name!r}")
    for name, check in checks:
        value = msg.get(name, _MISSING)
        if value is _MISSING or not check(value):
            raise ProtocolError(f"{mtype}: missing or bad field {name!r}")
    if optional:
        for name, check in optional.items():
            if name in msg and not check(msg[name]):
                raise ProtocolError(f"{mtype}: bad field {name!r}")
    return mtype


_SCALARS = (type(None), bool, int, float, str, bytes)
MAX_DEPTH = 100


def check_outgoing(kind: Any, payload: Any) -> None:
    """Refuse, before anything is sent, what the receiving side would have to reject.

    A kind must be a non-empty string of at most 256 characters outside the reserved
    ``gp2p.`` prefix; dict keys in the payload must be strings. Raises
    :class:`~gp2p.errors.EncodeError` (a ``ValueError``).
    """
    if type(kind) is not str or kind not in _GOOD_KINDS:
        _check_kind(kind)
    if type(payload) not in _SCALARS:
        _check_value(payload, 0)


#: kinds check_outgoing() accepted already (an application uses a handful)
_GOOD_KINDS: set[str] = set()


def _check_kind(kind: Any) -> None:
    if not _nonempty_str(kind):
        raise EncodeError(f"a message kind is a string of 1 to {MAX_NAME} characters, not {kind!r}")
    if kind.startswith(RESERVED_PREFIX):
        raise EncodeError(f"kind {kind!r} uses the reserved prefix {RESERVED_PREFIX!r}")
    if type(kind) is str and len(_GOOD_KINDS) < 1024:
        _GOOD_KINDS.add(kind)


def check_payload(payload: Any) -> None:
    """Raise :class:`~gp2p.errors.EncodeError` for a payload with non-str dict keys or
    nesting deeper than 100 levels (other bad values fail in the codec)."""
    if type(payload) not in _SCALARS:
        _check_value(payload, 0)


def _check_value(value: Any, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise EncodeError(f"payload nested deeper than {MAX_DEPTH} levels")
    if type(value) is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise EncodeError(f"payload dict keys must be str, not {type(key).__name__}")
            if type(item) not in _SCALARS:
                _check_value(item, depth + 1)
    elif type(value) in (list, tuple):
        for item in value:
            if type(item) not in _SCALARS:
                _check_value(item, depth + 1)
