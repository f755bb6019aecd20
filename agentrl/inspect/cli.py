"""Arguments the inspection commands share (``tail``, ``inspect``, ``export``): the run, the filters, ``--from``."""

from __future__ import annotations

import argparse

from agentrl.inspect.filters import FILTER_PARAMS, TrajectoryFilter, parse_filter
from agentrl.inspect.location import RunLocation, resolve_run
from agentrl.inspect.position import Start, parse_start

__all__ = [
    "add_filter_arguments", "add_run_arguments", "add_start_argument", "filter_from", "location_from", "start_from",
]

_FLAGS = ("aborted", "resumed")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", nargs="?", default=None,
                   help="run directory, or a run name under runs/ (its config.yaml names the run)")
    p.add_argument("--config", "-c", default=None, help="the run's YAML config instead of a run directory")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable)")
    p.add_argument("--nats", default=None, metavar="URL",
                   help="read from this NATS server (remote runs); default: the run's running server, "
                        "else a private server on a copy of its stored stream")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="tokenizer to decode tokens with (default: the run config's worker.tokenizer or engine.model)")


def add_filter_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("filters (all must hold)")
    for name, help_text in FILTER_PARAMS.items():
        if name in _FLAGS:
            g.add_argument(f"--{name}", action="store_true", help=help_text)
        else:
            g.add_argument(f"--{name}", default=None, metavar="VALUE", help=help_text)


def add_start_argument(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--from", dest="start", default=default, metavar="WHERE",
                   help="where to start: start, end, N or seq:N, last:N, version:N, an ISO time, "
                        f"or a duration ago like 10m (default: {default})")


def location_from(args: argparse.Namespace) -> RunLocation:
    return resolve_run(args.run, config=args.config, overrides=args.overrides, url=args.nats)


def filter_from(args: argparse.Namespace) -> TrajectoryFilter:
    return parse_filter({name: getattr(args, name, None) for name in FILTER_PARAMS})


def start_from(args: argparse.Namespace) -> Start:
    return parse_start(args.start)
