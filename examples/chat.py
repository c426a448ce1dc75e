"""A chat room between terminals: every line you type reaches every node of the network.

    python examples/chat.py --listen 127.0.0.2:7001 --nick alice
    python examples/chat.py --listen 127.0.0.3:0 --connect 127.0.0.2:7001 --nick bob
    python examples/chat.py --listen 127.0.0.4:0 --connect 127.0.0.3:<bob's port> --nick carol

Each line is sent with ``node.broadcast``, so it reaches nodes you are not connected to:
above, carol sees alice's lines relayed by bob (add ``--target-outbound 0`` to keep every
node to its ``--connect`` peers, else discovery may link carol to alice directly).
Lines from others appear as ``<nick> text`` (your own are not echoed); your direct peers
joining and leaving as ``* <id> joined (direction)`` / ``* <id> left (reason)``. End with
Ctrl-D (EOF), Ctrl-C or SIGTERM. The example does not monkey-patch: it reads stdin through
gevent's cooperative file object, so waiting for you to type never blocks the node.
"""
import argparse
import os
import signal
import sys

import gevent
from gevent.fileobject import FileObjectPosix

import gp2p


def say(text):
    # stdout may be a pipe (a script, a test): flush so every line shows at once
    print(text, flush=True)


def type_lines(node, nick):
    """Broadcast each line read from stdin to the room; stop the node at EOF."""
    stdin = FileObjectPosix(sys.stdin.fileno(), "r", close=False)
    for line in stdin:
        node.broadcast("chat.line", {"nick": nick, "text": line.rstrip("\n")})
    node.stop()


def main():
    parser = argparse.ArgumentParser(description="Chat with other gp2p nodes.")
    parser.add_argument("--listen", default="127.0.0.1:0", help="host:port to listen on")
    parser.add_argument("--connect", action="append", default=[], metavar="HOST:PORT",
                        help="a peer to stay connected to (repeatable)")
    parser.add_argument("--nick", default=os.environ.get("USER", "anon"))
    parser.add_argument("--target-outbound", type=int, default=gp2p.Config.target_outbound,
                        help="peers found by discovery to dial besides --connect (0: none)")
    args = parser.parse_args()

    node = gp2p.Node(listen=args.listen, persistent_peers=args.connect,
                     target_outbound=args.target_outbound)

    def well_formed(peer, payload):
        # a malformed line is dropped here and, since a broadcast is relayed only once
        # accepted, goes no further than this node
        return (isinstance(payload, dict) and isinstance(payload.get("nick"), str)
                and isinstance(payload.get("text"), str))

    @node.on("chat.line", validate=well_formed)
    def show_line(peer, payload):
        if peer is not None:  # None: our own line, which the terminal already shows
            say(f"<{payload['nick']}> {payload['text']}")

    @node.on_event("peer_connected")
    def joined(peer):
        say(f"* {peer.id[:8]} joined ({peer.direction})")

    @node.on_event("peer_disconnected")
    def left(peer, reason):
        say(f"* {peer.id[:8]} left ({reason.name.lower()})")

    node.start()
    for signum in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(signum, node.stop)
    say(f"listening {node.address} as {node.id[:8]}")
    typing = gevent.spawn(type_lines, node, args.nick)
    try:
        node.serve_forever()
    finally:
        typing.kill()
        # FileObjectPosix made stdin non-blocking; a terminal shares that flag with the shell
        os.set_blocking(sys.stdin.fileno(), True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
