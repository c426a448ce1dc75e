"""gp2p bench, run as subprocesses: the JSON shape, modes, --only, and the far-end process.

These tests check what the bench reports and that its child process never lingers; they
never check how fast anything is.
"""
import json
import os
import re
import signal
import struct
import sys

import gevent
from gevent import socket, subprocess

from gp2p.bench import FIGURES
from gp2p.testing import next_host, wait_until

GP2P = [sys.executable, "-m", "gp2p"]
LATENCY_KEYS = ("p50_us", "p99_us", "raw_p50_us", "raw_p99_us")


def bench(*args, timeout=90):
    proc = subprocess.run(GP2P + ["bench", "--duration", "0.2", "--json", *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=timeout, text=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1]), proc


def far_pid(stderr_text):
    found = re.search(r"far end is process (\d+)", stderr_text)
    assert found, stderr_text
    return int(found.group(1))


def alive(pid):
    """True while ``pid`` runs (a zombie waiting for its reaper does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def test_every_figure_in_both_modes_with_a_table_and_json():
    result, proc = bench()
    assert list(result) == ["inproc", "twoproc"]
    for mode, figures in result.items():
        assert list(figures) == list(FIGURES), mode
        for name, row in figures.items():
            assert row["unit"] == FIGURES[name]
            assert row["gp2p"] > 0 and row["raw"] > 0, (mode, name, row)
            assert isinstance(row["ratio"], float) and row["ratio"] > 0, (mode, name, row)
            latencies = [row.get(key) for key in LATENCY_KEYS]
            if name in ("pingpong", "request"):
                assert all(isinstance(v, float) and v > 0 for v in latencies), (mode, name, row)
            else:
                assert latencies == [None] * 4, (mode, name, row)
            assert re.search(rf"^{mode}\s+{name}\s+[\d,]+\s+[\d,]+\s+[\d.]+\s+{re.escape(row['unit'])}",
                             proc.stdout, re.M), proc.stdout
    assert not alive(far_pid(proc.stderr))


def test_only_request_in_twoproc_and_the_child_is_gone():
    result, proc = bench("--only", "request", "--mode", "twoproc")
    assert list(result) == ["twoproc"] and list(result["twoproc"]) == ["request"]
    assert result["twoproc"]["request"]["gp2p"] > 0
    assert not alive(far_pid(proc.stderr))


def test_only_takes_comma_lists_and_refuses_unknown_names():
    proc = subprocess.run(GP2P + ["bench", "--only", "pingpong,nosuch", "--only", "request"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60, text=True)
    assert proc.returncode == 2 and "nosuch" in proc.stderr and "pingpong" not in proc.stdout


def test_far_end_serves_until_stdin_closes():
    proc = subprocess.Popen([sys.executable, "-m", "gp2p.bench", "--serve"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        with gevent.Timeout(30):
            addresses = json.loads(proc.stdout.readline())
        assert set(addresses) == {"echo", "sink", "node", "fanout"} and len(addresses["fanout"]) == 10
        host, port = addresses["echo"].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10, source_address=(next_host(), 0)) as sock:
            sock.sendall(struct.pack(">I", 3) + b"abc")
            got = b""
            while len(got) < 7:
                chunk = sock.recv(7 - len(got))
                assert chunk, got
                got += chunk
        assert got == struct.pack(">I", 3) + b"abc"
        proc.stdin.close()
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_far_end_exits_when_the_bench_is_killed():
    proc = subprocess.Popen(GP2P + ["bench", "--mode", "twoproc", "--only", "pingpong", "--duration", "60"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    pid = None
    try:
        with gevent.Timeout(30):
            lines = []
            while pid is None:
                line = proc.stderr.readline()
                assert line, "".join(lines)
                lines.append(line)
                if "far end is process" in line:
                    pid = far_pid(line)
        assert alive(pid)
        proc.kill()
        proc.wait()
        wait_until(lambda: not alive(pid), 20, message=f"far end {pid} outlived the bench")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if pid is not None and alive(pid):
            os.kill(pid, signal.SIGKILL)
        proc.stderr.close()

