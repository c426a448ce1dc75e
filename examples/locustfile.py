"""Load-test a gp2p node with locust: every locust user is one client-only gp2p node.

On the target machine:

    gp2p node --echo --listen 0.0.0.0:7000 --max-inbound 1000 --max-per-ip 1000

One machine, headless, 100 users for 30 s:

    locust -f examples/locustfile.py --headless -u 100 -r 20 -t 30s --host gp2p://HOST:7000

Past one machine: one master and a worker per core on each load machine:

    locust -f examples/locustfile.py --headless --master --expect-workers 2 \\
        -u 200 -r 50 -t 30s --host gp2p://HOST:7000
    locust -f examples/locustfile.py --worker --master-host MASTER      # on each worker

Needs ``pip install 'gp2p[locust]'``. Importing locust monkey-patches gevent; gp2p works
patched. Results are reported per operation (connect, request, send, ping, broadcast).
"""
import logging

from locust import between, task

from gp2p.contrib.locust import P2PUser

# one node per user: its start/stop lines at INFO would drown locust's own output
logging.getLogger("gp2p").setLevel(logging.WARNING)


class EchoUser(P2PUser):
    """Mostly request/response and one-way messages, some pings, a few broadcasts.

    Every broadcast reaches every other user through the target (n users: n - 1 copies),
    so it gets the smallest weight.
    """

    wait_time = between(0.05, 0.2)
    payload_size = 256
    # node_config = {"network_id": "my-network"}   # when the target is not on gp2p-main

    @task(5)
    def echo(self):
        self.request()

    @task(3)
    def message(self):
        self.send()

    @task(2)
    def ping_target(self):
        self.ping()

    @task(1)
    def gossip(self):
        self.broadcast()


# The same operations as a ready-made weighted task set (request 4, send 3, ping 2,
# broadcast 1), for when the mix does not need tuning:
#
#     from gp2p.contrib.locust import P2PTasks
#
#     class QuickUser(P2PUser):
#         tasks = [P2PTasks]
#         wait_time = between(0.05, 0.2)
