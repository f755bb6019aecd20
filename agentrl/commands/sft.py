"""``agentrl sft``: supervised warm-up on chat demonstrations (JSONL) before RL (see trainer/sft.py)."""

from __future__ import annotations

import argparse
import logging

from agentrl.commands import Command, add_common_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p)
    p.add_argument("--model", help="Hugging Face model directory to start from (learner.model)")
    p.add_argument("--data", help="JSONL file, one {\"messages\": [...]} per line (learner.sft_data)")
    p.add_argument("--output", help="where to write the trained HF checkpoint (learner.sft_output)")
    p.add_argument("--epochs", type=int, help="passes over the data (learner.sft_epochs)")


def _overrides(args: argparse.Namespace) -> list[str]:
    pairs = {"model": args.model, "sft_data": args.data, "sft_output": args.output, "sft_epochs": args.epochs}
    out = [*args.overrides, *(f"learner.{k}={v}" for k, v in pairs.items() if v is not None)]
    return [*out, f"name={args.run}"] if args.run is not None else out


def run(args: argparse.Namespace) -> int:
    from agentrl.config.loader import load_config
    from agentrl.config.run import RunConfig
    from trainer.sft import run_sft  # the trainer package (torch) is loaded only by this command

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(RunConfig, args.config, _overrides(args))
    out, losses = run_sft(cfg)
    print(f"sft: {len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}; model written to {out}")
    return 0


COMMAND = Command(
    name="sft", help="supervised warm-up on chat demonstrations (masked SFT loss)", add_arguments=add_arguments, run=run
)
