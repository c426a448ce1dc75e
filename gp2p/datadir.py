"""DataDir: what a node keeps on disk (its key, address book and bans) and where.

Created with mode 0700 when missing. Every file is written atomically with mode 0600; a
corrupt address book or ban list is moved aside to ``.bak`` with a warning and the node
starts without it (it never loads damaged state silently).
"""
from __future__ import annotations

import logging
import os
import time

from gp2p import addressfile
from gp2p.addressbook import AddressBook, layout_for
from gp2p.bans import BanList
from gp2p.identity import Identity

log = logging.getLogger(__name__)

__all__ = ["DataDir"]


class DataDir:
    """The files of one node under ``path``."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(path, mode=0o700, exist_ok=True)
        self.key_path = os.path.join(path, "node.key")
        self.book_path = os.path.join(path, "addressbook.json")
        self.bans_path = os.path.join(path, "bans.json")

    def __repr__(self) -> str:
        return f"<DataDir {self.path}>"

    def identity(self) -> Identity:
        return Identity.load_or_create(self.key_path)

    def load_book(self, capacity: int) -> AddressBook:
        return addressfile.load_or_quarantine(self.book_path, **layout_for(capacity))

    def save_book(self, book: AddressBook) -> None:
        addressfile.save(book, self.book_path)

    def load_bans(self, bans: BanList) -> None:
        bans.load(self.bans_path, time.time())

    def save_bans(self, bans: BanList) -> None:
        bans.save(self.bans_path, time.time())
