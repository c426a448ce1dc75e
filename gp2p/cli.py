"""The ``gp2p`` command: ``node``, ``swarm`` and ``bench``.

The CLI never monkey-patches. Logs go to stderr; stdout carries only the results a script
reads (``<id> <address>`` for ``node``, a summary or one JSON line for ``swarm``).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
from typing import Any, Sequence

import gevent

from gp2p import __version__
from gp2p.config import Config, split_list

log = logging.getLogger("gp2p.cli")

__all__ = ["main", "build_parser"]

# fields whose default is None, and so whose type cannot be read off the default
_NONE_TYPES = {"listen": str, "advertise": str, "source_address": str, "send_timeout": float,
               "datadir": str}
_ALIASES = {"persistent_peers": ["--connect"], "target_outbound": ["--outbound"]}
_HELP = {
    "listen": "host:port, host:0, host:7000-7100 or host:7000,7003 ('none': client only)",
    "bootstrap": "seed address; repeatable, comma-separated lists too",
    "persistent_peers": "address redialled for ever (--connect); repeatable",
}


def _listen_value(text: str) -> str | None:
    return None if text.lower() in ("none", "") else text


class _ListAction(argparse.Action):
    """Repeatable flag that also splits comma-separated values."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None) -> None:
        current = list(getattr(namespace, self.dest, None) or [])
        current.extend(split_list(values))
        setattr(namespace, self.dest, current)


def add_config_flags(parser: argparse.ArgumentParser, skip: Sequence[str] = ()) -> None:
    """A ``--flag`` for every Config field (defaults stay Config's own)."""
    group = parser.add_argument_group("node configuration (see README: Configuration)")
    for f in dataclasses.fields(Config):
        if f.name in skip:
            continue
        flags = ["--" + f.name.replace("_", "-")] + _ALIASES.get(f.name, [])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = _HELP.get(f.name, "") + (f" (default: {default})" if default not in (None, []) else "")
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if isinstance(default, list):
            kwargs.update(action=_ListAction, metavar="ADDR")
        elif f.name == "listen":
            kwargs.update(type=_listen_value, metavar="SPEC")
        else:
            kwargs["type"] = _NONE_TYPES.get(f.name) or type(default)
        group.add_argument(*flags, **kwargs)


def config_from_args(args: argparse.Namespace, **overrides: Any) -> Config:
    """A Config from the flags that were given (others keep their defaults)."""
    names = set(Config.field_names())
    fields = {k: v for k, v in vars(args).items() if k in names}
    fields.update(overrides)
    return Config(**fields)


def _setup_logging(level: str) -> None:
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def cmd_node(args: argparse.Namespace) -> int:
    from gp2p.node import Node

    _setup_logging(args.log_level)
    try:
        config = config_from_args(args)
    except (TypeError, ValueError) as exc:
        print(f"gp2p node: {exc}", file=sys.stderr)
        return 2
    node = Node(config=config)
    if args.echo:  # a target for load tests (gp2p.contrib.locust)
        node.on("load.echo")(lambda peer, payload: payload)
        node.on("load.msg")(lambda peer, payload: None)
        node.on("load.gossip")(lambda peer, payload: None)
    node.start()
    print(f"{node.id} {node.address}", flush=True)
    for signum in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(signum, node.stop)
    try:
        node.serve_forever()
    except KeyboardInterrupt:
        node.stop()
    return 0


def cmd_swarm(args: argparse.Namespace) -> int:
    from gp2p.swarm import Swarm, SwarmTooBig, make_view

    _setup_logging(args.log_level)
    # this process is the swarm's: gevent's record of where each greenlet was spawned (a
    # stack summary per greenlet) costs time and memory that hundreds of thousands of
    # connection greenlets do not need; and the cyclic collector is kept off what has
    # lived a while (Swarm(defer_full_gc=True))
    gevent.config.track_greenlet_tree = False
    try:
        swarm = Swarm(n=args.nodes, outbound=args.outbound, messages=args.messages,
                      broadcasts=args.broadcasts, rate=args.rate, duration=args.duration,
                      payload_size=args.payload_size, kill=args.kill, transport=args.transport,
                      seed=args.seed, heartbeat_interval=args.heartbeat_interval,
                      peer_timeout=args.peer_timeout, converge_timeout=args.converge_timeout,
                      view=make_view(sys.stderr), defer_full_gc=True)
        result = swarm.run()
    except (SwarmTooBig, ValueError) as exc:
        print(f"gp2p swarm: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(result.summary(), file=sys.stderr)
        print(result.to_json(), flush=True)
    else:
        print(result.summary(), flush=True)
    return 0 if result.ok else 1


def cmd_bench(args: argparse.Namespace) -> int:
    from gp2p.bench import run_bench

    _setup_logging(args.log_level)
    return run_bench(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gp2p", description="gp2p: peer-to-peer networking on gevent")
    parser.add_argument("--version", action="version", version=f"gp2p {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    node = sub.add_parser("node", help="run one node in the foreground",
                          description="Run one node. Prints '<id> <address>' once listening; "
                                      "logs go to stderr; SIGINT/SIGTERM stop it cleanly.")
    add_config_flags(node)
    node.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    node.add_argument("--echo", action="store_true",
                      help="load-test target: answer 'load.echo' requests with their payload and "
                           "quietly accept 'load.msg' and 'load.gossip' (see README: locust)")
    node.set_defaults(func=cmd_node)

    swarm = sub.add_parser("swarm", help="many nodes in one process, with a summary",
                           description="Start a local network of nodes as greenlets (each knows "
                                       "only node 0), wait for it to converge, exchange messages "
                                       "and broadcasts (optionally killing part of the network "
                                       "halfway), print the figures. Exit 0 when it converged and "
                                       "every message and broadcast reached every live node; 1 "
                                       "otherwise; 2 when the run does not fit this process.")
    swarm.add_argument("--nodes", type=int, default=20, help="number of nodes (default 20)")
    swarm.add_argument("--outbound", type=int, default=8, help="outbound connections per node (default 8)")
    swarm.add_argument("--transport", choices=("tcp", "memory"), default="tcp",
                       help="tcp: 127.x.y.z loopback sockets (default); memory: the in-memory "
                            "network, 10.x.y.z, no file descriptors")
    swarm.add_argument("--messages", type=int, default=1, help="messages each node sends each peer (default 1)")
    swarm.add_argument("--broadcasts", type=int, default=10, help="broadcasts from random nodes (default 10)")
    swarm.add_argument("--rate", type=float, default=10.0,
                       help="broadcasts per second (default 10; 0: all at once)")
    swarm.add_argument("--duration", type=float, default=None,
                       help="length of the broadcast phase in seconds: rate x duration broadcasts "
                            "(overrides --broadcasts)")
    swarm.add_argument("--payload-size", type=int, default=64, help="bytes per broadcast (default 64)")
    swarm.add_argument("--kill", type=float, default=0.0, metavar="FRACTION",
                       help="after half the broadcasts, kill this fraction of the nodes (never node 0) "
                            "abruptly, measure the heal, then send the other half")
    swarm.add_argument("--heartbeat-interval", type=float, default=None,
                       help="default: 2 s up to 200 nodes, then scaled to the connections")
    swarm.add_argument("--peer-timeout", type=float, default=None,
                       help="default: 5 s up to 200 nodes, then 3 heartbeat intervals")
    swarm.add_argument("--converge-timeout", type=float, default=120.0, help="give up after (default 120 s)")
    swarm.add_argument("--seed", type=int, default=None,
                       help="random seed: which nodes broadcast and are killed (printed when not given)")
    swarm.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    swarm.add_argument("--log-level", default="WARNING")
    swarm.set_defaults(func=cmd_swarm)

    bench = sub.add_parser("bench", help="gp2p against raw gevent sockets, in the same run",
                           description="Measure gp2p and raw gevent sockets side by side, in one "
                                       "process and across two, and print the ratios.")
    bench.add_argument("--duration", type=float, default=2.0,
                       help="seconds per measurement (default 2.0; all figures, both modes: about 1 min)")
    bench.add_argument("--only", action=_ListAction, metavar="NAME",
                       help="pingpong, request, oneway_100, oneway_64k, broadcast; repeatable or comma-separated")
    bench.add_argument("--mode", default="both", choices=("inproc", "twoproc", "both"),
                       help="far end in this process, in a child process, or both (default)")
    bench.add_argument("--codec", default="msgpack", choices=("msgpack", "json"))
    bench.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    bench.add_argument("--log-level", default="WARNING")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
