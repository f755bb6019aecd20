"""Decode attention over the paged KV pool: the Triton kernel against the runner's gathered SDPA, same run.

The Qwen2.5-0.5B attention shape (14 heads, 2 kv heads, head_dim 64, bf16), each row's table as wide as the
engine's (context 4,096 + the scratch position), page size 1 with each row's slots scattered over the pool.
Per batch size B and workload (``short``: lengths uniform in 256..512, mean ~384; ``longtail``: lognormal,
median ~300, a few rows up to the whole context), three ways of computing one layer's decode attention:

- ``sdpa_graph``: what a captured decode step runs today (:func:`agentrl.engine.runner.gathered_sdpa` over
  ``kv_len = context + 1`` keys, masked);
- ``sdpa_eager``: the eager path's best case, ``kv_len`` = the longest row (it needs lengths on the host);
- ``kernel``: :func:`agentrl.engine.decode_attention.paged_decode_attention` with each row's length.

On CUDA each way is captured as one CUDA graph of ``--layers`` calls (what one decode step holds) and timed
with CUDA events, median of ``--iters`` replays; the JSON row per (B, workload) gives ms per step and the
ratios against the kernel, and the largest difference between the kernel's and SDPA's outputs.

    python bench/decode_attention.py --device cuda                # B = 64, 256, 512 at context 4096
    python bench/decode_attention.py --device cpu                 # tiny sizes under Triton's interpreter
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._timing import graph_time_ms

HEADS, KV_HEADS, HEAD_DIM = 14, 2, 64


def lengths(workload: str, batch: int, context: int, gen: torch.Generator) -> torch.Tensor:
    """Keys per row (the new token included), int32 on the CPU."""
    if workload == "short":
        n = torch.randint(256, 513, (batch,), generator=gen).float()
    else:
        n = torch.empty(batch).log_normal_(mean=5.7, std=0.9, generator=gen)
    scaled = n * context / 4096  # the same shape of workload on the CPU's small context
    return scaled.clamp(1, context).int()


def layout(lens: torch.Tensor, context: int, gen: torch.Generator) -> tuple[torch.Tensor, int]:
    """Each row's slots scattered over a pool of sum(lens) + 1 slots; unused positions hold the scratch slot."""
    total = int(lens.sum())
    perm = torch.randperm(total, generator=gen)
    table = torch.full((len(lens), context + 1), total, dtype=torch.long)
    start = 0
    for b, n in enumerate(lens.tolist()):
        table[b, :n] = perm[start : start + n]
        start += n
    return table, total + 1


def measure(batch: int, workload: str, args: argparse.Namespace, device: torch.device) -> dict[str, object]:
    from agentrl.engine.decode_attention import default_num_splits, paged_decode_attention
    from agentrl.engine.runner import gathered_sdpa

    gen = torch.Generator().manual_seed(batch)
    lens = lengths(workload, batch, args.context, gen)
    table, slots = layout(lens, args.context, gen)
    kv = torch.randn((2, slots, KV_HEADS, HEAD_DIM), generator=gen).to(device, args.dtype)
    q = torch.randn((batch, HEADS, 1, HEAD_DIM), generator=gen).to(device, args.dtype)
    table, lens = table.to(device), lens.to(device)
    scale = HEAD_DIM**-0.5
    pos = (lens.long() - 1).view(-1, 1, 1, 1)

    def sdpa(kv_len: int) -> Callable[[], torch.Tensor]:
        read, mask = table[:, :kv_len], torch.arange(kv_len, device=device).view(1, 1, 1, -1) <= pos
        return lambda: gathered_sdpa(q, kv[0], kv[1], read, mask, scale)

    ways = {
        "sdpa_graph": sdpa(args.context + 1),
        "sdpa_eager": sdpa(int(lens.max())),
        "kernel": lambda: paged_decode_attention(q[:, :, 0], kv[0], kv[1], table, lens, scale),
    }
    err = float((ways["kernel"]().float() - ways["sdpa_graph"]()[:, :, 0].float()).abs().max())
    ms = {name: graph_time_ms(fn, args.layers, args.iters, device) for name, fn in ways.items()}
    return {
        "batch": batch, "workload": workload, "mean_len": round(float(lens.float().mean()), 1),
        "max_len": int(lens.max()), "splits": default_num_splits(batch, KV_HEADS, args.context + 1, device),
        **{f"{name}_ms": round(v, 4) for name, v in ms.items()},
        "x_vs_graph": round(ms["sdpa_graph"] / ms["kernel"], 3),
        "x_vs_eager": round(ms["sdpa_eager"] / ms["kernel"], 3),
        "max_abs_diff": err,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--batches", type=int, nargs="+", help="default: 64 256 512 (cuda), 2 5 (cpu)")
    parser.add_argument("--workloads", nargs="+", default=["short", "longtail"], choices=["short", "longtail"])
    parser.add_argument("--context", type=int, help="default: 4096 (cuda), 192 (cpu)")
    parser.add_argument("--layers", type=int, help="calls per timed step; default: 24 (cuda), 1 (cpu)")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if not cuda:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
        args.iters = min(args.iters, 2)
    args.batches = args.batches or ([64, 256, 512] if cuda else [2, 5])
    args.context = args.context or (4096 if cuda else 192)
    args.layers = args.layers or (24 if cuda else 1)
    args.dtype = torch.bfloat16 if cuda else torch.float32
    device = torch.device(args.device)
    for batch in args.batches:
        for workload in args.workloads:
            row = measure(batch, workload, args, device)
            print(json.dumps(row), flush=True)
            print(f"x  B={batch} {workload}: kernel {row['kernel_ms']} ms vs graph SDPA {row['sdpa_graph_ms']} ms "
                  f"({row['x_vs_graph']}x), eager SDPA {row['sdpa_eager_ms']} ms ({row['x_vs_eager']}x) "
                  f"per {args.layers} layers", flush=True)


if __name__ == "__main__":
    main()
