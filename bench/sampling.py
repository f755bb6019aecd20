"""The engine's sampling step: the fused Triton sampler vs the torch sampler, same logits, same run.

Times :func:`agentrl.engine.sampling.sample_on_device` both ways (CUDA events, each way captured in a CUDA
graph of ``--calls`` calls so launch overhead does not count; on CPU, wall time under Triton's interpreter with
tiny sizes, so the script cannot rot) for rows without truncation, and with top-k logprobs asked, and prints
ms per call and the ratio, plus how many tokens the two drew alike.

    python bench/sampling.py --device cuda                 # rows 64/256/512, Qwen2 vocabulary (151,936)
    TRITON_INTERPRET=1 python bench/sampling.py            # CPU: tiny sizes
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agentrl.engine.sampling import SamplingBatch, sample_on_device
from bench._timing import graph_time_ms


def params(rows: int, top_logprobs: int, device: torch.device) -> SamplingBatch:
    """Per-row parameters already on the device (a host-to-device copy cannot be captured in a CUDA graph)."""
    temps = [1.0, 0.7, 0.0, 1.0]
    sb = SamplingBatch.build(
        [temps[i % 4] for i in range(rows)], [1.0] * rows, [-1] * rows, [0.0] * rows, list(range(rows)),
        [7] * rows, [[] for _ in range(rows)], [top_logprobs] * rows, [None] * rows,
    )
    for name in ("temperature", "top_p", "top_k", "min_p", "seed", "step"):
        setattr(sb, name, getattr(sb, name).to(device))
    return sb


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--rows", type=lambda s: [int(x) for x in s.split(",")], default=None)
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--calls", type=int, default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    rows_list = args.rows or ([64, 256, 512] if gpu else [4])
    vocab = args.vocab or (151_936 if gpu else 3000)
    calls = args.calls or (20 if gpu else 2)
    print(f"device={device} vocab={vocab} calls={calls}")
    print(f"{'rows':>5} | {'top-k':>5} | {'torch ms':>9} | {'triton ms':>9} | {'speedup':>7} | same tokens")
    for rows in rows_list:
        logits = torch.randn(rows, vocab, device=device, generator=torch.Generator(device).manual_seed(rows)) * 3
        for k in (0, 5):
            sb = params(rows, k, device)
            ms = {fused: graph_time_ms(lambda f=fused, x=logits, b=sb: sample_on_device(x, b, fused=f), calls, 3,
                                      device) / calls
                  for fused in (False, True)}
            same = (sample_on_device(logits, sb, fused=False).tokens == sample_on_device(logits, sb, fused=True).tokens)
            print(f"{rows:>5} | {k:>5} | {ms[False]:>9.3f} | {ms[True]:>9.3f} | {ms[False] / ms[True]:>6.2f}x | "
                  f"{int(same.sum())}/{rows}")


if __name__ == "__main__":
    main()
