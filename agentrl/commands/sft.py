"""``agentrl sft``: supervised warm-up on chat demonstrations (JSONL) before RL (see trainer/sft.py)."""

from __future__ import annotations

import argparse

from agentrl.commands import Command, add_common_arguments, load_run_config, setup_logging


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p)
    p.add_argument("--model", help="Hugging Face model directory to start from (learner.model)")
    p.add_argument("--data", help="JSONL file, one {\"messages\": [...]} per line (learner.sft_data)")
    p.add_argument("--output", help="where to write the trained HF checkpoint (learner.sft_output)")
    p.add_argument("--epochs", type=int, help="passes over the data (learner.sft_epochs)")


_FLAGS = {"model": "learner.model", "data": "learner.sft_data", "output": "learner.sft_output",
          "epochs": "learner.sft_epochs"}


def run(args: argparse.Namespace) -> int:
    from trainer.sft import run_sft  # the trainer package (torch) is loaded only by this command

    setup_logging()
    cfg = load_run_config(args, _FLAGS)
    out, losses = run_sft(cfg)
    print(f"sft: {len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}; model written to {out}")
    return 0


COMMAND = Command(
    name="sft", help="supervised warm-up on chat demonstrations (masked SFT loss)", add_arguments=add_arguments, run=run
)
