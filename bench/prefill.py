"""The engine's prefill step: ragged (prompts packed into one row) vs padded (each to the longest, masked).

Three batches, each prefilled by the same model through two runners that differ only in ``ragged_prefill``, in
the same run, timed over ``--repeats`` (after one warm-up each):

- ``uniform``: ``--rows`` prompts of 2 × ``--short`` tokens (nothing to save: the cost of packing);
- ``mixed``: one long prompt (``--long``) and ``--rows - 1`` short ones (``--short``) — a new conversation
  beside later turns, what an agentic batch looks like;
- ``turns``: every row continues a cached conversation (``--context`` tokens already in the pool) by a new turn
  of ``--short`` tokens, one row's context ``--long`` tokens longer: padded reads every row's keys up to the
  longest context.

Printed per batch: ms per prefill step each way, tokens computed (padded: rows × longest chunk), the speedup,
and the largest difference between the two ways' next-token logits (they must agree).

    python -m bench.prefill                                                   # CPU, small model
    python -m bench.prefill --device cuda --shape qwen2.5-0.5b --dtype bfloat16 --rows 64
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from agentrl.engine.runner import ModelRunner
from agentrl.engine.tiny import init_model
from bench.engine import SHAPES


def runners(model_dir: Path, args: argparse.Namespace) -> dict[str, ModelRunner]:
    from transformers import AutoModelForCausalLM

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(args.device).eval()
    context = args.context + args.long + args.short + 8
    pool = args.rows * context + 8
    return {way: ModelRunner(model, args.rows, context, pool, ragged_prefill=way == "ragged")
            for way in ("padded", "ragged")}


def timed(fn: Callable[[], torch.Tensor], repeats: int, device: str) -> tuple[float, torch.Tensor]:
    out = fn()
    runs = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        began = time.perf_counter()
        out = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        runs.append(time.perf_counter() - began)
    return statistics.median(runs), out


def step(runner: ModelRunner, rows: list[int], chunks: list[list[int]], starts: list[int]) -> torch.Tensor:
    return runner.prefill(rows, chunks, starts).logits


def batches(args: argparse.Namespace, vocab: int) -> dict[str, tuple[list[list[int]], list[int]]]:
    """Per batch: the chunks to prefill and the cached tokens each continues."""
    rng = np.random.default_rng(0)

    def ids(n: int) -> list[int]:
        return rng.integers(10, vocab, n).tolist()

    mixed = [ids(args.long)] + [ids(args.short) for _ in range(args.rows - 1)]
    turns = [ids(args.short) for _ in range(args.rows)]
    uniform = [ids(args.short * 2) for _ in range(args.rows)]
    return {"uniform": (uniform, [0] * args.rows), "mixed": (mixed, [0] * args.rows), "turns": (turns, [args.context + args.long] + [args.context] * (args.rows - 1))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", choices=sorted(SHAPES), default="small")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--long", type=int, default=1024)
    p.add_argument("--short", type=int, default=64)
    p.add_argument("--context", type=int, default=512, help="cached tokens each row of the turns batch continues")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    model_dir = init_model(Path(tempfile.mkdtemp(prefix="agentrl-bench-prefill-")) / "model", SHAPES[args.shape])
    ways = runners(model_dir, args)
    rows = list(range(args.rows))
    for runner in ways.values():  # every row's table: its own stretch of the pool
        span = runner.context_length
        runner.set_rows(rows, [np.arange(r * span, (r + 1) * span, dtype=np.int64) for r in rows])
    print(f"shape={args.shape} device={args.device} dtype={args.dtype} rows={args.rows} long={args.long} "
          f"short={args.short} context={args.context}")
    print(f"{'batch':<6} {'padded ms':>10} {'ragged ms':>10} {'speedup':>8} {'tokens real':>12} {'padded':>9}  "
          f"max |logits diff|")
    for name, (chunks, starts) in batches(args, SHAPES[args.shape].vocab_size).items():
        results = {way: timed(functools.partial(step, runner, rows, chunks, starts), args.repeats, args.device)
                   for way, runner in ways.items()}
        (padded_s, padded_out), (ragged_s, ragged_out) = results["padded"], results["ragged"]
        real, padded_tokens = sum(len(c) for c in chunks), len(chunks) * max(len(c) for c in chunks)
        diff = (padded_out - ragged_out).abs().max().item()
        print(f"{name:<6} {1e3 * padded_s:>10.1f} {1e3 * ragged_s:>10.1f} {padded_s / ragged_s:>7.2f}x "
              f"{real:>12,} {padded_tokens:>9,}  {diff:.2e}")


if __name__ == "__main__":
    main()
