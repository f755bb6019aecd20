"""``agentrl learner``: consume trajectories from the bus, train, publish weights (see trainer/learner.py)."""

from __future__ import annotations

import argparse
import logging

from agentrl.commands import Command, add_common_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p)
    p.add_argument("--model", help="Hugging Face model directory to start from (learner.model)")
    p.add_argument("--max-steps", type=int, help="stop after this many steps (learner.max_steps; 0 = never)")


def _overrides(args: argparse.Namespace) -> list[str]:
    out = [*args.overrides]
    if args.model is not None:
        out.append(f"learner.model={args.model}")
    if args.max_steps is not None:
        out.append(f"learner.max_steps={args.max_steps}")
    if args.run is not None:
        out.append(f"name={args.run}")
    return out


def run(args: argparse.Namespace) -> int:
    from agentrl.config.loader import load_config
    from agentrl.config.run import RunConfig
    from trainer.main import run_learner  # the trainer package (torch) is loaded only by this command

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(RunConfig, args.config, _overrides(args))
    run_learner(cfg, args.nats or cfg.nats.url)
    return 0


COMMAND = Command(
    name="learner", help="train the policy on trajectories from the bus and publish weights",
    add_arguments=add_arguments, run=run,
)
