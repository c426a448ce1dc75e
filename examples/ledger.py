"""A replicated ledger: producers gossip blocks of signed transactions; all keep the best chain.

    python examples/ledger.py --listen 127.0.0.2:7001 --produce
    python examples/ledger.py --listen 127.0.0.3:0 --connect 127.0.0.2:7001 --produce --pay 1
    python examples/ledger.py --listen 127.0.0.4:0 --connect 127.0.0.2:7001 --produce
    python examples/ledger.py --listen 127.0.0.5:0 --connect 127.0.0.4:<its port>

- A transaction ``{"from", "to", "amount", "nonce", "sig"}`` is broadcast as ``ledger.tx``:
  ``from`` is an Ed25519 public key (hex) and ``sig`` its signature over the canonical JSON
  of the other fields. ``--pay S`` makes a node pay a random account every S seconds.
- A block is ``{"height", "parent", "producer", "time", "txs", "hash"}``, where ``hash`` is the
  sha256 of the canonical JSON (sorted keys, no spaces) of the other fields. Every node
  starts from the same genesis block (height 0).
- Each ``--produce`` node, while it has a peer, makes a block on its head every
  ``--interval`` seconds (give or take half) from its pending transactions, empty if there
  are none, and broadcasts it as ``ledger.block``.
- Validation hooks reject a transaction with a bad format or signature, and a block with a
  bad format, hash or transaction, an unknown parent or the wrong height. A rejected
  message is neither delivered nor relayed.
- Forks: the head is the known block of greatest height; between blocks of equal height the
  lowest hash (compared as hex strings) wins. Nodes that have seen the same blocks have the
  same head.
- Catch-up: a block with an unknown parent, a new peer, and otherwise every few seconds,
  make a node request ``ledger.blocks`` ``{"from": height}`` from a peer, starting at its
  own head's height. The peer answers with up to 100 blocks of its best chain; when the
  first one does not attach, the node steps further back (the chains forked below its head).

Transactions are not checked against balances or replays beyond their ids, and producers
are not authenticated: a real chain would add both. Stdout shows ``listening <address>``,
then ``head <height> <hash8>`` whenever the head changes and ``caught up <n> blocks from
<id8>`` after a catch-up that brought something new. ``--blocks N``: producers stop at height N,
so the network settles on one head; every node keeps serving until Ctrl-C or SIGTERM.
"""
import argparse
import hashlib
import itertools
import json
import logging
import random
import signal
import sys
import time

import gevent
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from gevent.event import Event

import gp2p

log = logging.getLogger("ledger")

BLOCK_FIELDS = {"height", "parent", "producer", "time", "txs", "hash"}
TX_FIELDS = {"from", "to", "amount", "nonce", "sig"}
BATCH = 100  # blocks per catch-up answer, and transactions per block
MAX_DRIFT = 60.0  # seconds a block's time may be ahead of ours
SYNC_EVERY = 3.0  # seconds between catch-ups with a random peer when nothing asks for one


def say(text):
    print(text, flush=True)  # stdout may be a pipe: flush so every line shows at once


def canonical(value):
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def digest(value):
    return hashlib.sha256(canonical(value)).hexdigest()


def block_hash(block):
    return digest({k: v for k, v in block.items() if k != "hash"})


def make_block(height, parent, producer, txs, when):
    block = {"height": height, "parent": parent, "producer": producer, "time": when, "txs": txs}
    block["hash"] = block_hash(block)
    return block


GENESIS = make_block(0, "0" * 64, "genesis", [], 0)


def tx_problem(tx):
    """Why ``tx`` is invalid, or None."""
    if not isinstance(tx, dict) or set(tx) != TX_FIELDS:
        return "bad transaction format"
    amount, nonce = tx["amount"], tx["nonce"]
    if not (isinstance(amount, int) and amount > 0 and isinstance(nonce, int)
            and isinstance(tx["to"], str)):
        return "bad transaction format"
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(tx["from"]))
        key.verify(bytes.fromhex(tx["sig"]), canonical({k: v for k, v in tx.items() if k != "sig"}))
    except (TypeError, ValueError, InvalidSignature):
        return "bad signature"
    return None


class Chain:
    """Every valid block we know, and the best chain among them (no I/O)."""

    def __init__(self):
        self.blocks = {GENESIS["hash"]: GENESIS}
        self.main = [GENESIS["hash"]]  # hashes of the best chain, by height

    @property
    def head(self):
        return self.blocks[self.main[-1]]

    def problem(self, block):
        """Why ``block`` cannot be added, or None."""
        if not isinstance(block, dict) or set(block) != BLOCK_FIELDS:
            return "bad format"
        if not (isinstance(block["height"], int) and isinstance(block["parent"], str)
                and isinstance(block["producer"], str) and isinstance(block["time"], (int, float))
                and isinstance(block["txs"], list) and len(block["txs"]) <= BATCH):
            return "bad format"
        if block["hash"] != block_hash(block):
            return "bad hash"
        parent = self.blocks.get(block["parent"])
        if parent is None:
            return "unknown parent"
        if block["height"] != parent["height"] + 1:
            return "wrong height"
        if block["time"] > time.time() + MAX_DRIFT:
            return "time in the future"
        for tx in block["txs"]:
            problem = tx_problem(tx)
            if problem:
                return problem
        if len({digest(tx) for tx in block["txs"]}) != len(block["txs"]):
            return "duplicate transaction"
        return None

    def add(self, block):
        """Store a valid block; True if it became the head (longest chain, then lowest hash)."""
        self.blocks[block["hash"]] = block
        head = self.head
        if block["height"] < head["height"] or (block["height"] == head["height"]
                                                and block["hash"] >= head["hash"]):
            return False
        branch = []  # the new best chain, from the block down to where it meets the old one
        while block["height"] >= len(self.main) or self.main[block["height"]] != block["hash"]:
            branch.append(block["hash"])
            block = self.blocks[block["parent"]]
        del self.main[block["height"] + 1:]
        self.main.extend(reversed(branch))
        return True

    def since(self, height, limit):
        """Up to ``limit`` blocks of the best chain from ``height`` on."""
        return [self.blocks[h] for h in self.main[height:height + limit]]


class Ledger:
    """The app: handlers, validators, block production, payments and catch-up."""

    def __init__(self, node):
        self.node = node
        self.chain = Chain()
        self.pending = {}  # transaction id -> transaction, not yet in a block we know
        self.included = set()  # ids of the transactions in blocks we know
        self.key = Ed25519PrivateKey.generate()
        self.account = self.key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
        self.wanted = set()  # ids of the peers to catch up from
        self.wake = Event()
        node.on("ledger.tx", validate=self.valid_tx)(self.on_tx)
        node.on("ledger.block", validate=self.valid_block)(self.on_block)
        node.on("ledger.blocks")(self.serve_blocks)
        node.on_event("peer_connected")(lambda peer: self.want_catch_up(peer.id))

    # -- handlers and validators ---------------------------------------------------------

    def valid_tx(self, peer, tx):
        return tx_problem(tx) is None

    def on_tx(self, peer, tx):
        tx_id = digest(tx)
        if tx_id not in self.included:
            self.pending[tx_id] = tx

    def valid_block(self, peer, block):
        problem = self.chain.problem(block)
        if problem == "unknown parent":
            self.want_catch_up(peer.id)  # we missed blocks: ask the peer that has them
        if problem:
            log.info("rejected a block from %s: %s", peer.id[:8], problem)
        return problem is None

    def on_block(self, peer, block):
        self.accept(block)

    def serve_blocks(self, peer, payload):
        start = payload.get("from") if isinstance(payload, dict) else None
        if not isinstance(start, int) or start < 0:
            raise ValueError("'from' must be a height >= 0")
        return self.chain.since(start, BATCH)

    def accept(self, block):
        """Add a valid block; 1 if it was new, else 0."""
        if block["hash"] in self.chain.blocks:
            return 0
        for tx in block["txs"]:
            self.included.add(digest(tx))
            self.pending.pop(digest(tx), None)
        if self.chain.add(block):
            say(f"head {block['height']} {block['hash'][:8]}")
        return 1

    # -- background work -----------------------------------------------------------------

    def produce(self, interval, limit):
        while True:
            gevent.sleep(interval * random.uniform(0.5, 1.5))
            head = self.chain.head
            if self.node.closed or not self.node.peers or (limit and head["height"] >= limit):
                continue
            txs = list(self.pending.values())[:BATCH]
            block = make_block(head["height"] + 1, head["hash"], self.node.id[:16], txs,
                               time.time())
            self.accept(block)
            self.node.broadcast("ledger.block", block)

    def pay(self, every):
        for nonce in itertools.count(1):
            gevent.sleep(every)
            if self.node.closed:
                continue
            tx = {"from": self.account, "to": f"acct-{random.randrange(10)}",
                  "amount": random.randint(1, 100), "nonce": nonce}
            tx["sig"] = self.key.sign(canonical(tx)).hex()
            self.node.broadcast("ledger.tx", tx)

    def want_catch_up(self, peer_id):
        self.wanted.add(peer_id)
        self.wake.set()

    def catch_up_loop(self):
        """Catch up from the peers asked for, or from a random peer every SYNC_EVERY s."""
        while True:
            self.wake.wait(SYNC_EVERY)
            self.wake.clear()
            wanted, self.wanted = self.wanted, set()
            if not wanted and self.node.peers:
                wanted = {random.choice(self.node.peers).id}
            for peer_id in wanted:
                if not self.node.closed:
                    self.catch_up(peer_id)

    def catch_up(self, peer_id):
        """Request the blocks we miss from one peer and add them."""
        start, step, added = max(1, self.chain.head["height"]), 1, 0
        while True:
            try:
                blocks = self.node.request(peer_id, "ledger.blocks", {"from": start}, timeout=10.0)
            except gp2p.GP2PError as exc:
                log.info("catch-up from %s failed: %r", peer_id[:8], exc)
                break
            if not isinstance(blocks, list):
                break
            if blocks and start > 1 and self.chain.problem(blocks[0]) == "unknown parent":
                start, step = max(1, start - step), step * 2  # we forked below our head
                continue
            for block in blocks:
                problem = self.chain.problem(block)
                if problem:
                    log.warning("%s sent a bad block: %s", peer_id[:8], problem)
                    return
                added += self.accept(block)
            if len(blocks) < BATCH:
                break
            start = blocks[-1]["height"] + 1
        if added:
            say(f"caught up {added} blocks from {peer_id[:8]}")


def main():
    parser = argparse.ArgumentParser(description="A replicated ledger on gp2p.")
    parser.add_argument("--listen", default="127.0.0.1:0", help="host:port to listen on")
    parser.add_argument("--connect", action="append", default=[], metavar="HOST:PORT",
                        help="a peer to stay connected to (repeatable)")
    parser.add_argument("--produce", action="store_true", help="make blocks")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between blocks")
    parser.add_argument("--blocks", type=int, default=0, metavar="N",
                        help="stop producing once the head reaches height N (0: never)")
    parser.add_argument("--pay", type=float, default=0, metavar="SECONDS",
                        help="broadcast a payment every SECONDS (0: never)")
    parser.add_argument("--log-level", default="warning", help="debug, info, warning, ...")
    args = parser.parse_args()
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")

    node = gp2p.Node(listen=args.listen, persistent_peers=args.connect)
    ledger = Ledger(node)
    node.start()
    for signum in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(signum, node.stop)
    say(f"listening {node.address}")
    jobs = [gevent.spawn(ledger.catch_up_loop)]
    if args.produce:
        jobs.append(gevent.spawn(ledger.produce, args.interval, args.blocks))
    if args.pay:
        jobs.append(gevent.spawn(ledger.pay, args.pay))
    try:
        node.serve_forever()
    finally:
        gevent.killall(jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
