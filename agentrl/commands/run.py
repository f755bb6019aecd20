"""``agentrl run CONFIG.yaml``: start every actor of a local run under one supervisor."""

from __future__ import annotations

import argparse
import asyncio

from agentrl.commands import Command, add_print_config_argument, load_run_config, setup_logging
from agentrl.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config_file", nargs="?", metavar="CONFIG", help="run config (YAML), e.g. configs/quickstart.yaml")
    p.add_argument("--config", "-c", default=None, help="the run config, as every actor takes it (instead of CONFIG)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set training.max_steps=10 (repeatable)")
    p.add_argument("--nats", default=None, metavar="URL", help="use this NATS server instead of the embedded one")
    p.add_argument("--run", default=None, help="run name (overrides name)")
    add_print_config_argument(p)


def config_path(args: argparse.Namespace) -> str:
    """The config file, given as ``CONFIG`` or ``--config`` (one of them, or both naming the same file)."""
    given = {c for c in (args.config_file, args.config) if c}
    if not given:
        raise ConfigError("agentrl run needs a config file: agentrl run CONFIG (or --config CONFIG)")
    if len(given) > 1:
        raise ConfigError(f"two config files given ({args.config_file} and --config {args.config}); pass one")
    return given.pop()


def run(args: argparse.Namespace) -> int:
    from agentrl.launch.local import run_local

    args.config = config_path(args)
    cfg = load_run_config(args, {"nats": "nats.url"})
    setup_logging()
    completed, _ = asyncio.run(run_local(cfg))
    return 0 if completed else 130


COMMAND = Command(name="run", help="run every actor of a local training run (NATS, engines, workers, controller, learner)",
                  add_arguments=add_arguments, run=run)
