"""gp2p swarm: sizing, the file-descriptor budget, the kill/heal timeline and the JSON."""
import gc
import json
import resource
import sys
import time

import pytest
from gevent import subprocess

from gp2p.swarm import (DIAL_CAP, FULL_GC_THRESHOLD, SEED_PENDING, PlainView, Swarm, SwarmTooBig,
                        ensure_fd_limit, fd_budget, format_status, make_view, sizing)
from gp2p.testing import assert_stopped_clean

JSON_KEYS = {"nodes", "heartbeat_interval", "peer_timeout", "converge_s", "connections", "broadcasts",
             "coverage", "redundancy", "hops_max", "latency_p50_ms", "latency_p99_ms", "msgs_per_s",
             "rss_mb", "rss_kb_per_connection", "killed", "heal_s", "coverage_after_kill"}


def swarm_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "gp2p", "swarm", *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=timeout)


@pytest.mark.parametrize("nodes, outbound, expected", [
    (20, 8, (2.0, 5.0)), (200, 8, (2.0, 5.0)), (1000, 8, (10.0, 30.0)), (10000, 8, (60.0, 180.0)),
])
def test_heartbeats_are_sized_to_the_run(nodes, outbound, expected):
    assert sizing(nodes, outbound) == expected


def test_heartbeat_round_trips_stay_near_the_budget():
    for nodes in (300, 1000, 3000):
        interval, timeout = sizing(nodes, 8)
        round_trips = 2 * nodes * 8 / interval  # both ends of every connection ping
        assert round_trips <= 2000 and timeout == 3 * interval


def test_fd_budget_counts_listeners_connections_and_dials():
    assert fd_budget(1000, 8) == 1000 * 17 + 2 * DIAL_CAP + SEED_PENDING + 200
    assert fd_budget(10000, 8, "memory") == 200


def test_fd_limit_is_raised_to_the_budget_or_refused():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        if soft < hard:
            assert ensure_fd_limit(soft + 1) == soft + 1
            assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == soft + 1
        if hard != resource.RLIM_INFINITY:
            with pytest.raises(SwarmTooBig, match="--transport memory"):
                ensure_fd_limit(hard + 1)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_cli_refuses_a_run_that_needs_too_many_fds():
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard limit on open files here")
    nodes = hard // 17 + 1
    proc = swarm_cli("--nodes", str(nodes), timeout=30)
    assert proc.returncode == 2
    assert "file descriptors" in proc.stderr and "--transport memory" in proc.stderr
    assert proc.stdout == ""


class RecordingView(PlainView):
    def __init__(self):
        super().__init__(None)
        self.gc_thresholds = []

    def log(self, line):
        self.gc_thresholds.append(gc.get_threshold())


def test_kill_half_way_heals_and_reaches_every_survivor():
    before = gc.get_threshold()
    view = RecordingView()
    swarm = Swarm(n=16, outbound=3, broadcasts=6, rate=0, kill=0.25, seed=11, view=view,
                  heartbeat_interval=0.5, peer_timeout=2.0, converge_timeout=30, defer_full_gc=True)
    result = swarm.run()
    # the CLI's setting: no full collection during the run, the collector as it was after
    assert view.gc_thresholds and all(t[2] == FULL_GC_THRESHOLD for t in view.gc_thresholds)
    assert gc.get_threshold() == before
    assert result.ok, result.summary()
    assert result.killed == 4 and len(swarm.live) == 12 and 0 in swarm.live
    assert result.heal_s is not None and result.coverage_after_kill == 1.0
    assert result.coverage == 1.0 and result.hops_max >= 1
    for node in swarm.nodes:
        assert_stopped_clean(node)


def test_not_converging_is_reported_not_hidden():
    swarm = Swarm(n=10, outbound=3, broadcasts=2, heartbeat_interval=0.5, peer_timeout=2.0,
                  converge_timeout=0.0)
    result = swarm.run()
    assert result.converge_s is None and not result.ok
    assert "not converged" in result.errors[0]
    for node in swarm.nodes:
        assert_stopped_clean(node)


def test_json_has_every_key_and_nulls_what_does_not_apply():
    proc = swarm_cli("--nodes", "8", "--outbound", "2", "--broadcasts", "3", "--rate", "0",
                     "--heartbeat-interval", "0.2", "--peer-timeout", "1", "--seed", "7", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert JSON_KEYS <= set(result)
    assert result["nodes"] == 8 and result["broadcasts"] == 3 and result["coverage"] == 1.0
    assert result["killed"] is None and result["heal_s"] is None and result["coverage_after_kill"] is None
    assert result["converge_s"] > 0 and result["connections"] >= 8 and result["msgs_per_s"] > 0
    assert result["deliveries"] == result["expected"] > 0
    assert result["heartbeat_interval"] == 0.2 and result["seed"] == 7


def test_plain_view_without_a_terminal(tmp_path):
    with open(tmp_path / "out", "w") as stream:
        view = make_view(stream)
        assert isinstance(view, PlainView)
        view.status({"phase": "joining", "elapsed": 1.5, "nodes": 10, "up": 10, "connections": 12,
                     "converged": 0.5, "msgs_per_s": 3.0})
        view.log("done")
    text = (tmp_path / "out").read_text()
    assert "nodes up 10/10" in text and "converged  50.0%" in text and text.endswith("done\n")
    assert format_status({"phase": "x", "elapsed": 0, "nodes": 1, "up": 1, "connections": 0,
                          "converged": 1.0, "msgs_per_s": 0}).startswith("[x")


def test_delivery_waits_give_up_only_once_progress_stops(monkeypatch):
    monkeypatch.setattr("gp2p.swarm.PHASE_TIMEOUT", 0.3)
    swarm = Swarm(n=2)
    start = time.monotonic()

    def delivered():  # one more every 0.1 s for a second, three times PHASE_TIMEOUT
        return min(10, int((time.monotonic() - start) / 0.1))

    assert swarm._wait_deliveries(delivered, 10)
    assert time.monotonic() - start >= 1.0
    stalled = time.monotonic()
    assert not swarm._wait_deliveries(delivered, 11)
    assert time.monotonic() - stalled >= 0.3
