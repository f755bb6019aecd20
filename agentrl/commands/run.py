"""``agentrl run CONFIG.yaml``: start every actor of a local run under one supervisor."""

from __future__ import annotations

import argparse
import asyncio
import logging

from agentrl.commands import Command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config (YAML), e.g. configs/quickstart.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set learner.max_steps=10 (repeatable)")
    p.add_argument("--nats", default=None, metavar="URL", help="use this NATS server instead of the embedded one")
    p.add_argument("--run", default=None, help="run name (overrides name)")


def run(args: argparse.Namespace) -> int:
    from agentrl.config import RunConfig, load_config
    from agentrl.launch.local import run_local

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    overrides = [*args.overrides]
    if args.nats:
        overrides.append(f"nats.url={args.nats}")
    if args.run:
        overrides.append(f"name={args.run}")
    cfg = load_config(RunConfig, args.config, overrides)
    asyncio.run(run_local(cfg))
    return 0


COMMAND = Command(name="run", help="run every actor of a local training run (NATS, engines, workers, controller, learner)",
                  add_arguments=add_arguments, run=run)
