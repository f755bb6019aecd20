"""``agentrl learner``: consume trajectories from the bus, train, publish weights (see trainer/learner.py)."""

from __future__ import annotations

import argparse

from agentrl.commands import Command, add_common_arguments, load_run_config, setup_logging


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p)
    p.add_argument("--model", help="Hugging Face model directory to start from (learner.model)")
    p.add_argument("--max-steps", type=int, help="stop after this many steps (training.max_steps)")


_FLAGS = {"model": "learner.model", "max_steps": "training.max_steps"}


def run(args: argparse.Namespace) -> int:
    from trainer.main import run_learner  # the trainer package (torch) is loaded only by this command

    setup_logging()
    cfg = load_run_config(args, _FLAGS)
    run_learner(cfg, args.nats or cfg.nats.url)
    return 0


COMMAND = Command(
    name="learner", help="train the policy on trajectories from the bus and publish weights",
    add_arguments=add_arguments, run=run,
)
