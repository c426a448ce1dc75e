"""Address book files: a book and its anchors saved in ``datadir`` and read back safely.

The file is a checked JSON document (:mod:`gp2p.jsonfile`): format ``gp2p-addressbook``,
version 1, a SHA-256 checksum of the body, written atomically with mode 0600 (the body holds
the book's secret). The body is ``{"secret": hex, "anchors": [address, ...], "entries": [...]}``;
each entry keeps the fields of :class:`~gp2p.addressbook.AddressEntry` but not its position,
which is computed again on load, so a file survives a change of layout. A damaged, truncated
or unknown-version file is never loaded silently: :func:`load` raises
:class:`AddressBookCorrupt`, and :func:`load_or_quarantine` moves it aside to ``<path>.bak``,
logs a warning and starts an empty book.
"""
from __future__ import annotations

import logging
import math
from typing import Any

from gp2p import jsonfile
from gp2p.addressbook import AddressBook, AddressEntry
from gp2p.identity import is_node_id
from gp2p.netgroup import canonical_address

__all__ = ["AddressBookCorrupt", "to_json", "from_json", "save", "load", "load_or_quarantine"]

log = logging.getLogger(__name__)

FORMAT = "gp2p-addressbook"
VERSION = 1
_FIELDS = ("address", "source", "node_id", "last_seen", "last_success", "last_attempt",
           "last_failure", "attempts", "failures", "tried")
_TIMES, _COUNTS = _FIELDS[3:7], _FIELDS[7:9]


class AddressBookCorrupt(jsonfile.CorruptFile):
    """A saved address book failed its checks: bad JSON, format, version, checksum or entry."""


def _number(value: Any, kind: type | tuple[type, ...]) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)


def _entry(data: Any) -> AddressEntry:
    if not (isinstance(data, dict) and set(data) == set(_FIELDS)
            and canonical_address(data["address"]) == data["address"]
            and isinstance(data["source"], str) and isinstance(data["tried"], bool)
            and (data["node_id"] is None or is_node_id(data["node_id"]))
            and all(_number(data[name], (int, float)) for name in _TIMES)
            and all(_number(data[name], int) and data[name] >= 0 for name in _COUNTS)):
        raise ValueError(f"bad entry {data!r}")
    return AddressEntry(**data)


def to_json(book: AddressBook) -> str:
    """The book, its secret and its anchors as a checked JSON document."""
    body = {"secret": book.secret.hex(), "anchors": book.anchors,
            "entries": [{name: getattr(e, name) for name in _FIELDS} for e in book.entries()]}
    return jsonfile.dumps(FORMAT, VERSION, body)


def from_json(text: str, secret: bytes | None = None, **kwargs: Any) -> AddressBook:
    """A book rebuilt from :func:`to_json` output under the layout given by ``kwargs``
    (see :class:`AddressBook`; entries that no longer fit are dropped, the worst first).

    :param secret: replaces the stored secret when given
    :raises AddressBookCorrupt: for anything but an intact book of this version
    """
    body = jsonfile.loads(text, FORMAT, VERSION, AddressBookCorrupt)
    try:
        stored = bytes.fromhex(body["secret"])
        entries = [_entry(data) for data in body["entries"]]
        anchors = body["anchors"]
        if not isinstance(anchors, list) or any(canonical_address(a) != a for a in anchors):
            raise ValueError(f"bad anchors {anchors!r}")
        if len({e.address for e in entries}) != len(entries):
            raise ValueError("duplicate addresses")
    except (KeyError, TypeError, ValueError) as exc:
        raise AddressBookCorrupt(f"bad body: {exc}") from None
    book = AddressBook(secret if secret is not None else stored, **kwargs)
    book.anchors = anchors
    book.restore(entries)
    return book


def save(book: AddressBook, path: str) -> None:
    """Write ``book`` to ``path`` atomically with mode 0600 (temp file, fsync, rename)."""
    jsonfile.write_atomic(path, to_json(book).encode())


def load(path: str, secret: bytes | None = None, **kwargs: Any) -> AddressBook:
    """The book saved at ``path``; ``secret`` and ``kwargs`` as for :func:`from_json`.

    :raises FileNotFoundError: when there is none
    :raises AddressBookCorrupt: when it is damaged, truncated or of another version
    """
    return from_json(jsonfile.read_text(path, AddressBookCorrupt), secret, **kwargs)


def load_or_quarantine(path: str, secret: bytes | None = None, **kwargs: Any) -> AddressBook:
    """The book at ``path``, or an empty one when there is none or it is corrupt.

    A corrupt file is moved aside to ``<path>.bak`` (replacing an older one) with a warning,
    so it can be inspected. An empty book gets ``secret``, or a fresh one.
    """
    try:
        return load(path, secret, **kwargs)
    except FileNotFoundError:
        return AddressBook(secret, **kwargs)
    except AddressBookCorrupt as exc:
        backup = jsonfile.quarantine(path)
        log.warning("address book %s is corrupt (%s): moved it to %s, starting empty", path, exc, backup)
        return AddressBook(secret, **kwargs)
