"""The gp2p command, run as subprocesses."""
import dataclasses
import signal
import sys

from gevent import subprocess

from gp2p.config import Config
from gp2p.testing import NodeProcess, next_host

GP2P = [sys.executable, "-m", "gp2p"]
FAST = ("--network-id", "cli-test", "--heartbeat-interval", "0.2", "--peer-timeout", "1")


def run(*args, timeout=60):
    proc = subprocess.run(GP2P + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=timeout, text=True)
    return proc


def test_help_lists_a_flag_for_every_config_field():
    out = run("node", "--help").stdout
    for field in dataclasses.fields(Config):
        assert "--" + field.name.replace("_", "-") in out, field.name
    for alias in ("--connect", "--outbound", "--log-level"):
        assert alias in out
    for command in ("swarm", "bench"):
        assert run(command, "--help").returncode == 0


def test_bad_flag_values_exit_2():
    proc = run("node", "--peer-timeout", "1", "--heartbeat-interval", "2")
    assert proc.returncode == 2 and "peer_timeout" in proc.stderr


def test_node_prints_id_and_address_connects_and_stops_on_signals():
    a = NodeProcess("--listen", f"{next_host()}:0", *FAST)
    b = None
    try:
        assert len(a.id) == 64 and a.address.startswith("127.")
        b = NodeProcess("--listen", f"{next_host()}:0", *FAST, "--connect", a.address)
        a.wait_log(f"peer connected: <Peer {b.id[:8]}")
        b.wait_log(f"peer connected: <Peer {a.id[:8]}")
        assert b.stop(signal.SIGINT) == 0
        a.wait_log("SHUTDOWN")
        assert a.stop(signal.SIGTERM) == 0
        assert any("stopped" in line for line in a.stderr_lines)
    finally:
        a.kill()
        if b is not None:
            b.kill()


def test_version():
    proc = run("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("gp2p ")
