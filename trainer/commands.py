"""The trainer's subcommands of the ``agentrl`` CLI: ``agentrl learner`` and ``agentrl sft``.

They live here, not in :mod:`agentrl.commands`, so that the runtime never imports the trainer: the CLI finds
them through the ``agentrl.commands`` entry-point group (see pyproject.toml).
"""

from __future__ import annotations

import argparse

from agentrl.commands import Command, add_common_arguments, load_run_config, setup_logging

__all__ = ["LEARNER", "SFT"]


def _learner_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p)
    p.add_argument("--model", help="Hugging Face model directory to start from (learner.model)")
    p.add_argument("--max-steps", type=int, help="stop after this many steps (training.max_steps)")


def _run_learner(args: argparse.Namespace) -> int:
    from trainer.main import run_learner

    setup_logging()
    cfg = load_run_config(args, {"model": "learner.model", "max_steps": "training.max_steps"})
    run_learner(cfg, args.nats or cfg.nats.url)
    return 0


def _sft_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p)
    p.add_argument("--model", help="Hugging Face model directory to start from (learner.model)")
    p.add_argument("--data", help="JSONL file, one {\"messages\": [...]} per line (learner.sft_data)")
    p.add_argument("--output", help="where to write the trained HF checkpoint (learner.sft_output)")
    p.add_argument("--epochs", type=int, help="passes over the data (learner.sft_epochs)")


_SFT_FLAGS = {"model": "learner.model", "data": "learner.sft_data", "output": "learner.sft_output",
              "epochs": "learner.sft_epochs"}


def _run_sft(args: argparse.Namespace) -> int:
    from trainer.sft import run_sft

    setup_logging()
    cfg = load_run_config(args, _SFT_FLAGS)
    out, losses = run_sft(cfg)
    print(f"sft: {len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}; model written to {out}")
    return 0


LEARNER = Command(
    name="learner", help="train the policy on trajectories from the bus and publish weights",
    add_arguments=_learner_arguments, run=_run_learner,
)
SFT = Command(
    name="sft", help="supervised warm-up on chat demonstrations (masked SFT loss)", add_arguments=_sft_arguments,
    run=_run_sft,
)
