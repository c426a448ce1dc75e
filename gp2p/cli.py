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
    from gp2p.swarm import Swarm

    _setup_logging(args.log_level)
    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    swarm = Swarm(n=args.nodes, outbound=args.outbound, messages=args.messages,
                  broadcasts=args.broadcasts, seed=args.seed,
                  heartbeat_interval=args.heartbeat_interval, peer_timeout=args.peer_timeout,
                  converge_timeout=args.converge_timeout, progress=progress)
    result = swarm.run()
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
    node.set_defaults(func=cmd_node)

    swarm = sub.add_parser("swarm", help="many nodes in one process, with a summary",
                           description="Start a local network of nodes as greenlets (each knows "
                                       "only node 0), wait for it to converge, exchange messages "
                                       "and broadcasts, print the figures. Exit 1 if it did not "
                                       "converge or a message or broadcast delivery was missed.")
    swarm.add_argument("--nodes", type=int, default=20, help="number of nodes (default 20)")
    swarm.add_argument("--outbound", type=int, default=8, help="outbound connections per node (default 8)")
    swarm.add_argument("--messages", type=int, default=5, help="messages each node sends each peer")
    swarm.add_argument("--broadcasts", type=int, default=10, help="broadcasts from random nodes (default 10)")
    swarm.add_argument("--heartbeat-interval", type=float, default=None, help="default 2.0 s")
    swarm.add_argument("--peer-timeout", type=float, default=None,
                       help="default max(5.0, 2.5 x heartbeat interval) s")
    swarm.add_argument("--converge-timeout", type=float, default=60.0, help="give up after (s)")
    swarm.add_argument("--seed", type=int, default=None, help="random seed (which nodes broadcast)")
    swarm.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    swarm.add_argument("--log-level", default="WARNING")
    swarm.set_defaults(func=cmd_swarm)

    bench = sub.add_parser("bench", help="gp2p against raw gevent sockets, in the same run",
                           description="Measure gp2p and raw gevent sockets side by side and "
                                       "print the ratios.")
    bench.add_argument("--duration", type=float, default=2.0, help="seconds per measurement")
    bench.add_argument("--codec", default="msgpack", choices=("msgpack", "json"))
    bench.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    bench.add_argument("--log-level", default="WARNING")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
