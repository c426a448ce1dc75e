"""A replicated key-value store: every node keeps a copy; the last writer wins.

    python examples/kvstore.py --listen 127.0.0.2:7001
    python examples/kvstore.py --listen 127.0.0.3:0 --connect 127.0.0.2:7001

Then type commands:

    put KEY VALUE   store VALUE under KEY on every node (broadcast ``kv.put``)
    get KEY         read this node's copy
    rget KEY        ask a peer for its copy (request ``kv.get``)

Results print as ``KEY = VALUE`` (``KEY is not set`` when there is none); a value written
elsewhere prints as ``* KEY = VALUE (from <id8>)`` when it arrives, and peers joining and
leaving as ``* <id8> joined`` / ``* <id8> left``. Every write carries a version
``[time, origin node id]``: a node keeps the highest version it has seen, so all copies end
equal whatever order the writes arrive in. A node that connects to a peer copies the peer's
newer entries (request ``kv.dump``), so it also has what was written before it joined, and
prints ``* copied <n> entries from <id8>``. End with Ctrl-D (EOF), Ctrl-C or SIGTERM.
"""
import argparse
import os
import random
import signal
import sys
import time

import gevent
from gevent.fileobject import FileObjectPosix

import gp2p


def say(text):
    print(text, flush=True)  # stdout may be a pipe: flush so every line shows at once


def valid_entry(entry):
    """``{"key": str, "value": str, "version": [number, str]}``"""
    if not isinstance(entry, dict) or set(entry) != {"key", "value", "version"}:
        return False
    version = entry["version"]
    return (isinstance(entry["key"], str) and isinstance(entry["value"], str)
            and isinstance(version, list) and len(version) == 2
            and isinstance(version[0], (int, float)) and isinstance(version[1], str))


class Store:
    """This node's copy: key -> entry, merged by highest version."""

    def __init__(self, node):
        self.node = node
        self.entries = {}
        node.on("kv.put", validate=lambda peer, entry: valid_entry(entry))(self.on_put)
        node.on("kv.get")(self.serve_get)
        node.on("kv.dump")(lambda peer, payload: list(self.entries.values()))
        node.on_event("peer_connected")(self.joined)
        node.on_event("peer_disconnected")(lambda peer, reason: say(f"* {peer.id[:8]} left"))

    def joined(self, peer):
        say(f"* {peer.id[:8]} joined")
        gevent.spawn(self.copy_from, peer)  # not here: an event handler should not block

    def merge(self, entry):
        """Keep ``entry`` if it is newer than ours; True if it was."""
        old = self.entries.get(entry["key"])
        if old is not None and tuple(old["version"]) >= tuple(entry["version"]):
            return False
        self.entries[entry["key"]] = entry
        return True

    def on_put(self, peer, entry):
        self.merge(entry)
        # show a write from elsewhere that is still the latest (a copy may have brought it
        # first); None: our own put
        if peer is not None and self.entries[entry["key"]] == entry:
            say(f"* {entry['key']} = {entry['value']} (from {entry['version'][1][:8]})")

    def serve_get(self, peer, key):
        if not isinstance(key, str):
            raise TypeError("the key must be a string")
        return self.entries.get(key)

    def copy_from(self, peer):
        """Merge a new peer's entries into ours."""
        if self.node.closed:
            return
        try:
            entries = self.node.request(peer, "kv.dump", timeout=10.0)
        except gp2p.GP2PError as exc:
            say(f"! could not copy from {peer.id[:8]}: {exc}")
            return
        entries = entries if isinstance(entries, list) else []
        copied = sum(self.merge(entry) for entry in entries if valid_entry(entry))
        if copied:
            say(f"* copied {copied} entries from {peer.id[:8]}")

    def put(self, key, value):
        old = self.entries.get(key)
        # never behind the version we hold, even if our clock is
        stamp = max(time.time(), old["version"][0] + 1e-6 if old else 0.0)
        entry = {"key": key, "value": value, "version": [stamp, self.node.id]}
        self.node.broadcast("kv.put", entry)

    def remote_get(self, key):
        if not self.node.peers:
            return "! no peer to ask"
        peer = random.choice(self.node.peers)
        try:
            entry = self.node.request(peer, "kv.get", key, timeout=10.0)
        except gp2p.GP2PError as exc:
            return f"! {peer.id[:8]} did not answer: {exc}"
        if not valid_entry(entry):
            return f"{key} is not set (asked {peer.id[:8]})"
        return f"{key} = {entry['value']} (asked {peer.id[:8]})"


def run_command(store, line):
    """Carry out one command line; what to print, or None."""
    command, _, rest = line.strip().partition(" ")
    key, _, value = rest.strip().partition(" ")
    if command == "put" and key:
        store.put(key, value)
        return None
    if command == "get" and key:
        entry = store.entries.get(key)
        return f"{key} = {entry['value']}" if entry else f"{key} is not set"
    if command == "rget" and key:
        return store.remote_get(key)
    return "! commands: put KEY VALUE, get KEY, rget KEY" if command else None


def read_commands(store):
    """Run each command read from stdin; stop the node at EOF."""
    stdin = FileObjectPosix(sys.stdin.fileno(), "r", close=False)
    for line in stdin:
        reply = run_command(store, line)
        if reply is not None:
            say(reply)
    store.node.stop()


def main():
    parser = argparse.ArgumentParser(description="A replicated key-value store on gp2p.")
    parser.add_argument("--listen", default="127.0.0.1:0", help="host:port to listen on")
    parser.add_argument("--connect", action="append", default=[], metavar="HOST:PORT",
                        help="a peer to stay connected to (repeatable)")
    args = parser.parse_args()

    node = gp2p.Node(listen=args.listen, persistent_peers=args.connect)
    store = Store(node)
    node.start()
    for signum in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(signum, node.stop)
    say(f"listening {node.address} as {node.id[:8]}")
    reading = gevent.spawn(read_commands, store)
    try:
        node.serve_forever()
    finally:
        reading.kill()
        # FileObjectPosix made stdin non-blocking; a terminal shares that flag with the shell
        os.set_blocking(sys.stdin.fileno(), True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
