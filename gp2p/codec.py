"""Codecs: how one message (a dict) becomes the bytes of one frame body, and back.

Two codecs share one small interface: ``encode(obj) -> bytes`` and ``decode(bytes) -> obj``.
Decoding failures of any kind come out as :class:`~gp2p.errors.ProtocolError` only.
"""
from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

import msgpack

from gp2p.errors import EncodeError, ProtocolError

__all__ = ["Codec", "MsgpackCodec", "JsonCodec", "CODECS", "by_name", "by_id", "EncodeError"]


class Codec:
    """Interface of a codec."""

    name = ""
    id = 0

    def encode(self, obj: Any) -> bytes:
        raise NotImplementedError

    def decode(self, data: bytes) -> Any:
        raise NotImplementedError


_unpackb = msgpack.unpackb


def _no_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack extension type {code} is not allowed")


class MsgpackCodec(Codec):
    """msgpack with str/bytes kept apart and extension types refused."""

    name = "msgpack"
    id = 1

    def __init__(self) -> None:
        self._packer = msgpack.Packer(use_bin_type=True, strict_types=False)

    def encode(self, obj: Any) -> bytes:
        try:
            return self._packer.pack(obj)
        except (TypeError, ValueError, OverflowError) as exc:
            raise EncodeError(str(exc)) from None

    def decode(self, data: bytes) -> Any:
        # unpackb bounds every container by the size of ``data`` itself, so a frame cannot
        # announce more items than it has bytes for. Its defaults (msgpack >= 1.0) are what
        # we want: str as str, lists, str or bytes map keys only. The timestamp extension
        # does not reach ext_hook: it becomes a float, a type payloads may hold.
        try:
            return _unpackb(data, ext_hook=_no_ext, timestamp=1)
        except ProtocolError:
            raise
        except Exception as exc:  # msgpack raises many types for malformed input
            raise ProtocolError(f"undecodable msgpack frame: {exc.__class__.__name__}") from None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return {"$b": base64.b64encode(bytes(obj)).decode("ascii")}
    raise TypeError(f"cannot encode {type(obj).__name__}")


_MARKERS = ("$b", "$d")


def _escape(value: Any) -> Any:
    """``value`` with every dict whose only key is a marker (``$b``, ``$d``) wrapped as
    ``{"$d": [[key, value]]}``, so that it is not read back as bytes or as a wrapper."""
    if isinstance(value, dict):
        items = {k: _escape(v) for k, v in value.items()}
        if len(items) == 1 and next(iter(items)) in _MARKERS:
            return {"$d": [[k, v] for k, v in items.items()]}
        return items
    if isinstance(value, (list, tuple)):
        return [_escape(v) for v in value]
    return value


def _json_hook(obj: dict) -> Any:
    if len(obj) != 1:
        return obj
    if "$b" in obj:
        value = obj["$b"]
        if not isinstance(value, str):
            raise ProtocolError("bad $b value")
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError("bad base64 in $b") from None
    if "$d" in obj:
        pairs = obj["$d"]
        if (not isinstance(pairs, list) or len(pairs) != 1 or not isinstance(pairs[0], list)
                or len(pairs[0]) != 2 or pairs[0][0] not in _MARKERS):
            raise ProtocolError("bad $d value")
        return {pairs[0][0]: pairs[0][1]}
    return obj


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _valid_text(obj: Any) -> bool:
    """True when every string in ``obj`` (keys included) is encodable UTF-8."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def _no_constant(name: str) -> Any:
    raise ProtocolError(f"JSON constant {name} is not allowed")


class JsonCodec(Codec):
    """Compact UTF-8 JSON; bytes travel as ``{"$b": base64}``, and a dict whose only key is
    ``"$b"`` or ``"$d"`` travels escaped as ``{"$d": [[key, value]]}``."""

    name = "json"
    id = 2

    def __init__(self) -> None:
        self._encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False,
                                         allow_nan=False, default=_json_default)
        self._decoder = json.JSONDecoder(object_hook=_json_hook, parse_constant=_no_constant)

    def encode(self, obj: Any) -> bytes:
        try:
            return self._encoder.encode(_escape(obj)).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise EncodeError(str(exc)) from None

    def decode(self, data: bytes) -> Any:
        try:
            text = bytes(data).decode("utf-8")
            obj = self._decoder.decode(text)
        except ProtocolError:
            raise
        except (ValueError, RecursionError) as exc:
            raise ProtocolError(f"undecodable JSON frame: {exc.__class__.__name__}") from None
        if _SURROGATE_ESCAPE.search(text) and not _valid_text(obj):
            # a lone surrogate (only a \u escape can make one) is no Unicode text, and
            # could not be passed on in any codec
            raise ProtocolError("JSON frame with a lone surrogate")
        return obj


CODECS: dict[int, Codec] = {MsgpackCodec.id: MsgpackCodec(), JsonCodec.id: JsonCodec()}


def by_name(name: str) -> Codec:
    """The codec called ``name`` ("msgpack" or "json")."""
    for codec in CODECS.values():
        if codec.name == name:
            return codec
    raise ValueError(f"unknown codec {name!r}")


def by_id(codec_id: int) -> Codec | None:
    """The codec with wire id ``codec_id``, or None when unsupported."""
    return CODECS.get(codec_id)
