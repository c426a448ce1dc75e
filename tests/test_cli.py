"""The gp2p command, run as subprocesses."""
import dataclasses
import signal
import sys

import gevent
from gevent import subprocess

from gp2p.config import Config
from gp2p.testing import next_host, wait_until

GP2P = [sys.executable, "-m", "gp2p"]


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


class NodeProcess:
    def __init__(self, *args):
        self.proc = subprocess.Popen(GP2P + ["node", "--heartbeat-interval", "0.2", "--peer-timeout", "1",
                                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.stderr_lines = []
        self._drain = gevent.spawn(self._read_stderr)

    def _read_stderr(self):
        for line in self.proc.stderr:
            self.stderr_lines.append(line)

    def first_line(self, timeout=20):
        with gevent.Timeout(timeout):
            return self.proc.stdout.readline().split()

    def wait_log(self, text, timeout=20):
        wait_until(lambda: any(text in line for line in self.stderr_lines), timeout,
                   message=f"no log line with {text!r}:\n{''.join(self.stderr_lines)}")

    def stop(self, sig=signal.SIGTERM, timeout=20):
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=timeout)
        self._drain.join(timeout=5)
        return code

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._drain.kill()


def test_node_prints_id_and_address_connects_and_stops_on_signals():
    a = NodeProcess("--listen", f"{next_host()}:0", "--network-id", "cli-test")
    b = None
    try:
        a_id, a_address = a.first_line()
        assert len(a_id) == 64 and a_address.startswith("127.")
        b = NodeProcess("--listen", f"{next_host()}:0", "--network-id", "cli-test", "--connect", a_address)
        b_id, _ = b.first_line()
        a.wait_log(f"peer connected: <Peer {b_id[:8]}")
        b.wait_log(f"peer connected: <Peer {a_id[:8]}")
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
