"""locust integration: ``gp2p node --echo`` and a headless locust master with two workers.

Importing locust monkey-patches gevent, so neither locust nor ``gp2p.contrib.locust`` is ever
imported here: locust runs in subprocesses only.
"""
import importlib.util
import json
import os
import socket
import sys
import textwrap

import pytest
from gevent import subprocess

from gp2p.errors import RemoteError
from gp2p.testing import NodeProcess, next_host, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCUSTFILE = os.path.join(ROOT, "examples", "locustfile.py")
GP2P = [sys.executable, "-m", "gp2p"]

needs_locust = pytest.mark.skipif(importlib.util.find_spec("locust") is None,
                                  reason="locust is not installed (pip install '.[locust]')")


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))


def target_node(*args):
    """``gp2p node`` (with ``--echo`` or not) as a subprocess run from the source tree."""
    return NodeProcess("--listen", f"{next_host()}:0", *args, env=_env(), cwd=ROOT)


@pytest.mark.parametrize("echo", [True, False], ids=["echo", "plain"])
def test_node_echo_flag_answers_load_kinds(nodes, echo):
    target = target_node("--log-level", "DEBUG", *(["--echo"] if echo else []))
    try:
        client = nodes.make(listen=None, source_address=next_host())
        peer = client.connect(target.address)
        client.send(peer, "load.msg", b"x" * 100)
        client.broadcast("load.gossip", {"n": 1})
        payload = {"blob": os.urandom(64), "n": 7, "text": "echo"}
        if echo:
            assert client.request(peer, "load.echo", payload, timeout=10) == payload
        else:
            with pytest.raises(RemoteError) as info:
                client.request(peer, "load.echo", payload, timeout=10)
            assert info.value.type == "NoHandler"
        # the request was answered after the message and the broadcast were delivered (one
        # peer's handlers start in order): once the node has exited, its log is complete
        assert target.stop() == 0
        unhandled = [line for line in target.stderr_lines if "no handler for" in line]
        if echo:
            assert not unhandled, unhandled
        else:
            # (an unhandled broadcast is only counted, not logged)
            assert any("'load.msg'" in line for line in unhandled), target.stderr_lines
    finally:
        target.kill()


@needs_locust
def test_contrib_parses_host_and_picks_distinct_sources():
    script = textwrap.dedent("""
        from gp2p.contrib.locust import loopback_source, parse_target
        assert parse_target("gp2p://127.0.0.5:7000") == "127.0.0.5:7000"
        assert parse_target("gp2p://localhost:7000/") == "127.0.0.1:7000"
        for bad in (None, "", "http://127.0.0.1:7000", "gp2p://127.0.0.1", "gp2p://127.0.0.1:0",
                    "127.0.0.1:7000"):
            try:
                parse_target(bad)
            except ValueError as exc:
                assert "gp2p://" in str(exc) or "bad --host" in str(exc), exc
            else:
                raise AssertionError(f"accepted {bad!r}")
        for avoid in ("127.17.0.9", "127.0.0.2"):
            sources = [loopback_source(16, n, avoid=avoid) for n in range(3000)]
            assert len(set(sources)) == 3000 and avoid not in sources
            assert all(s.startswith("127.17.") and not s.endswith((".0", ".255")) for s in sources)
        every = {loopback_source(16, n, avoid="127.17.3.4") for n in range(256 * 254 - 1)}
        assert len(every) == 256 * 254 - 1 and "127.17.3.4" not in every
        assert loopback_source(17, 0, avoid="") != loopback_source(16, 0, avoid="")
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, timeout=60, cwd=ROOT, env=_env())
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def _free_port(host):
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@needs_locust
def test_locust_master_and_two_workers_against_echo_node(tmp_path):
    users = 6
    # 3 users per worker and at most 2 sockets per IP: every user must dial from its own address
    target = target_node("--echo", "--max-per-ip", "2")
    port = _free_port("127.0.0.1")
    locust = [sys.executable, "-m", "locust", "-f", LOCUSTFILE]
    master_cmd = locust + ["--headless", "--master", "--master-bind-host", "127.0.0.1",
                           "--master-bind-port", str(port), "--expect-workers", "2",
                           "--expect-workers-max-wait", "30", "-u", str(users), "-r", str(users),
                           "-t", "5s", "--host", f"gp2p://{target.address}",
                           "--json-file", str(tmp_path / "stats")]
    worker_cmd = locust + ["--worker", "--master-host", "127.0.0.1", "--master-port", str(port)]
    procs = {}
    try:
        for name, cmd in [("master", master_cmd), ("worker1", worker_cmd), ("worker2", worker_cmd)]:
            with open(tmp_path / f"{name}.log", "w") as log:
                procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=_env())

        def logs():
            return "\n".join(f"--- {n}:\n{(tmp_path / f'{n}.log').read_text()[-3000:]}" for n in procs)

        try:
            codes = {name: proc.wait(timeout=60) for name, proc in procs.items()}
        except subprocess.TimeoutExpired:
            raise AssertionError("locust did not finish within 60 s\n" + logs()) from None
        assert codes == {"master": 0, "worker1": 0, "worker2": 0}, logs()
        stats = {entry["name"]: entry for entry in json.loads((tmp_path / "stats.json").read_text())}
        assert set(stats) == {"connect", "request", "send", "ping", "broadcast"}, logs()
        assert all(entry["num_requests"] > 0 for entry in stats.values()), stats
        assert sum(entry["num_failures"] for entry in stats.values()) == 0, stats
        assert stats["connect"]["num_requests"] >= users
        assert target.proc.poll() is None, "the target node died"
        # each user stopped its node at the end: the target saw a disconnect(SHUTDOWN) from each
        wait_until(lambda: sum("peer disconnected" in line and line.rstrip().endswith("SHUTDOWN")
                               for line in target.stderr_lines) >= users, timeout=10,
                   message="not every user said goodbye:\n" + "".join(target.stderr_lines[-20:]))
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        target.kill()


DROPPING_USER = '''
from locust import constant, task

from gp2p.contrib.locust import P2PUser
from gp2p.errors import DisconnectReason


class DroppingUser(P2PUser):
    wait_time = constant(0.02)
    done = 0

    @task
    def echo_then_sometimes_drop(self):
        self.request()
        self.done += 1
        if self.done % 5 == 0:
            self.peer.close(DisconnectReason.SHUTDOWN, "the test drops the connection")
'''


@needs_locust
def test_user_reconnects_on_its_next_task_after_losing_the_connection(tmp_path):
    users = 3
    target = target_node("--echo", "--log-level", "WARNING")
    (tmp_path / "dropping.py").write_text(DROPPING_USER)
    cmd = [sys.executable, "-m", "locust", "-f", str(tmp_path / "dropping.py"), "--headless",
           "-u", str(users), "-r", str(users), "-t", "3s", "--host", f"gp2p://{target.address}",
           "--json-file", str(tmp_path / "stats"), "--only-summary"]
    proc = None
    try:
        with open(tmp_path / "locust.log", "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=_env())
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError("locust did not finish within 60 s") from None
        output = (tmp_path / "locust.log").read_text()[-3000:]
        assert code == 0, output
        stats = {entry["name"]: entry for entry in json.loads((tmp_path / "stats.json").read_text())}
        requests = stats["request"]["num_requests"]
        assert requests >= 10 * users, stats
        # each user drops its connection after every fifth request and connects again for the
        # next one: at least requests / 5 connects in all (so more than one per user)
        assert stats["connect"]["num_requests"] >= requests // 5, stats
        assert stats["connect"]["num_failures"] == stats["request"]["num_failures"] == 0, stats
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        target.kill()
