"""Checked JSON files: versioned, checksummed documents written atomically.

Used for state kept in ``datadir`` (the address book). A document is
``{"format": ..., "version": ..., "checksum": ..., "body": ...}`` where ``checksum`` is the
SHA-256 of the body's canonical JSON (sorted keys, no spaces, ASCII), so a damaged or
truncated file is always detected and never read as a smaller valid one.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any

from gp2p.errors import GP2PError

__all__ = ["CorruptFile", "dumps", "loads", "write_atomic", "read_text", "quarantine"]


class CorruptFile(GP2PError, ValueError):
    """A checked JSON document is damaged, truncated, of another format or version."""


def checksum(body: Any) -> str:
    """The SHA-256 hex digest of ``body``'s canonical JSON."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def dumps(format: str, version: int, body: Any) -> str:
    """The document for ``body`` as JSON text."""
    return json.dumps({"format": format, "version": version, "checksum": checksum(body), "body": body},
                      separators=(",", ":"))


def loads(text: str, format: str, version: int, error: type[CorruptFile] = CorruptFile) -> Any:
    """The body of a document made by :func:`dumps`.

    :raises CorruptFile: (or ``error``) for bad JSON, another format or version, or a
        checksum that does not match
    """
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise error(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != format:
        raise error(f"not a {format} file")
    if doc.get("version") != version:
        raise error(f"unsupported version {doc.get('version')!r}")
    body = doc.get("body")
    if doc.get("checksum") != checksum(body):
        raise error("checksum mismatch")
    return body


def read_text(path: str, error: type[CorruptFile] = CorruptFile) -> str:
    """The UTF-8 text at ``path``; ``error`` when it is not UTF-8, FileNotFoundError when absent."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"not UTF-8: {exc}") from None


def write_atomic(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data``, mode 0600, so that a crash leaves the old or the new file.

    The data goes to a temporary file in the same directory, is flushed and fsynced, then
    renamed over ``path``; the directory is fsynced where the platform allows.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def quarantine(path: str) -> str:
    """Move a bad file aside to ``<path>.bak`` (replacing an older one); returns that name."""
    backup = f"{path}.bak"
    os.replace(path, backup)
    return backup
