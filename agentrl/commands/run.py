"""``agentrl run CONFIG.yaml``: start every actor of a local run under one supervisor."""

from __future__ import annotations

import argparse
import asyncio

from agentrl.commands import Command, load_run_config, setup_logging


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config (YAML), e.g. configs/quickstart.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set training.max_steps=10 (repeatable)")
    p.add_argument("--nats", default=None, metavar="URL", help="use this NATS server instead of the embedded one")
    p.add_argument("--run", default=None, help="run name (overrides name)")


def run(args: argparse.Namespace) -> int:
    from agentrl.launch.local import run_local

    setup_logging()
    completed, _ = asyncio.run(run_local(load_run_config(args, {"nats": "nats.url"})))
    return 0 if completed else 130


COMMAND = Command(name="run", help="run every actor of a local training run (NATS, engines, workers, controller, learner)",
                  add_arguments=add_arguments, run=run)
