"""gp2p beside ordinary blocking stdlib code, made cooperative by gevent.monkey.patch_all().

After patching, stdlib threads are greenlets and stdlib sockets, ``time.sleep`` and locks
yield to the gevent hub, so plain blocking code and gp2p nodes share one thread. This
program runs, in one process:

- two gp2p nodes, alice and bob, on 127.0.0.2 and 127.0.0.3; bob dials alice;
- a stdlib ``http.server.ThreadingHTTPServer`` serving alice's peer list as JSON at /peers;
- a ``threading.Thread`` worker that waits (``queue.Queue.get``) for the message bob sends
  alice, then fetches /peers with ``urllib.request``.

It prints what happened and exits 0 if alice got the message and the page lists bob.
"""
from gevent import monkey

monkey.patch_all()  # first thing, before anything imports socket, threading or time

import json  # noqa: E402
import queue  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402

import gp2p  # noqa: E402

TIMEOUT = 10.0


def peers_page(node):
    """An HTTP handler class serving ``node``'s peers as JSON."""

    class PeersHandler(BaseHTTPRequestHandler):
        def do_GET(self):
            peers = [{"id": p.id, "address": p.address, "direction": p.direction}
                     for p in node.peers]
            body = json.dumps(peers).encode()
            self.send_response(200 if self.path == "/peers" else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args):
            pass  # keep stdout for the story the program tells

    return PeersHandler


def worker(inbox, url, results):
    """Plain blocking code: wait for alice's message, then fetch the peer page."""
    sender, payload = inbox.get(timeout=TIMEOUT)
    print(f"worker: alice got {payload['text']!r} from {sender[:8]}", flush=True)
    time.sleep(0.1)  # a blocking sleep: only this greenlet waits, the nodes keep running
    with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
        results["peers"] = json.load(response)
    print(f"worker: GET /peers -> {[p['id'][:8] for p in results['peers']]}", flush=True)


def main():
    alice = gp2p.Node(listen="127.0.0.2:0")
    inbox = queue.Queue()

    @alice.on("hello")
    def hello(peer, payload):
        inbox.put((peer.id, payload))

    alice.start()
    bob = gp2p.Node(listen="127.0.0.3:0", persistent_peers=[alice.address])
    httpd = ThreadingHTTPServer(("127.0.0.2", 0), peers_page(alice))
    server = threading.Thread(target=httpd.serve_forever, name="http", daemon=True)
    results = {}
    try:
        server.start()
        url = f"http://127.0.0.2:{httpd.server_address[1]}/peers"
        print(f"alice {alice.id[:8]} on {alice.address}, peer page at {url}", flush=True)
        bob.start()
        if not bob.wait_for_peers(1, TIMEOUT):
            print("FAIL: bob did not connect to alice", flush=True)
            return 1
        print(f"bob {bob.id[:8]} connected to alice", flush=True)
        job = threading.Thread(target=worker, args=(inbox, url, results), name="worker")
        job.start()
        bob.send(alice.id, "hello", {"text": "hi alice"})
        job.join(TIMEOUT)
    finally:
        httpd.shutdown()
        httpd.server_close()
        bob.stop()
        alice.stop()
    if [p["id"] for p in results.get("peers", [])] != [bob.id]:
        print(f"FAIL: expected the page to list bob only, got {results.get('peers')}", flush=True)
        return 1
    print("ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
