"""The learner's packed attention when every micro-batch brings new sequence lengths, as RL batches do.

One "micro-batch" = ``--layers`` forward + backward passes of causal attention over a packed row of ~``--tokens``
tokens (lognormal lengths, median ``--median``, at most ``--cap``), Qwen2.5-0.5B's heads (14 query, 2 key/value,
head dim 64), bf16. Each timed iteration draws **new** lengths (``--repeat`` reuses the first draw instead, as a
benchmark that replays one batch does). Three ways, each timed over the same draws in the same run:

- ``sdpa default``: one causal ``scaled_dot_product_attention`` per sequence, PyTorch choosing the backend (the
  backend it picks for the first sequence is printed: on recent builds with cuDNN >= 9.15 on Hopper, cuDNN
  attention, which builds an execution plan per new shape);
- ``sdpa no cuDNN``: the same with cuDNN left out (``trainer.backend.varlen``'s per-sequence fallback);
- ``flash varlen``: ``torch.nn.attention.varlen`` over the whole row, one launch per layer (the learner's path on
  a GPU in bf16).

Then the engine's prefill attention (``gathered_sdpa``: a padded batch with a boolean mask, GQA), forward only, on a
new (rows, prompt length) each iteration, with PyTorch's default backends and with cuDNN left out.

    python bench/attention_lengths.py --device cuda                  # new lengths every iteration
    python bench/attention_lengths.py --device cuda --repeat         # one draw replayed
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agentrl.engine import ragged
from trainer.backend import varlen

HEADS, GROUPS, DIM = 14, 2, 64
BACKEND_NAMES = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}


def draw(rng: np.random.Generator, tokens: int, median: float, cap: int) -> list[int]:
    """Lognormal lengths (sigma 1) until ``tokens`` are packed."""
    lens: list[int] = []
    while sum(lens) < tokens:
        lens.append(int(min(cap, max(2, rng.lognormal(math.log(median), 1.0)))))
    return lens


def qkv(lens: list[int], device: torch.device) -> tuple[torch.Tensor, ...]:
    t = sum(lens)
    return tuple(torch.randn(1, h, t, DIM, device=device, dtype=torch.bfloat16, requires_grad=True)
                 for h in (HEADS, GROUPS, GROUPS))


def sdpa_default(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: list[int]) -> torch.Tensor:
    outs, start = [], 0
    for n in lens:
        sl = slice(start, start + n)
        outs.append(F.scaled_dot_product_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], is_causal=True,
                                                   enable_gqa=True))
        start += n
    return torch.cat(outs, dim=2)


def sdpa_no_cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: list[int]) -> torch.Tensor:
    return varlen._per_sequence(q, k, v, lens, 0.0, None)


def flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: list[int]) -> torch.Tensor:
    out, _ = varlen.sdpa_varlen_attention(torch.nn.Module(), q, k, v, None, packed_seq_lens=lens)
    return out


def sdp_choice(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: object) -> str:
    choice = int(torch._fused_sdp_choice(q, k, v, enable_gqa=True, **kwargs))  # type: ignore[attr-defined]
    return BACKEND_NAMES.get(choice, str(choice))


def engine_prefill_choice(device: torch.device, no_cudnn: bool = False) -> str:
    """What SDPA picks for ``agentrl.engine.runner.gathered_sdpa``'s prefill call (boolean mask, GQA)."""
    q, k, v, mask = prefill_inputs(8, 300, device)
    with sdpa_kernel(ragged.PER_SEQUENCE_BACKENDS) if no_cudnn else contextlib.nullcontext():
        return sdp_choice(q, k, v, attn_mask=mask)


def micro_batch(fn: Callable[..., torch.Tensor], lens: list[int], layers: int, device: torch.device) -> float:
    """Seconds for ``layers`` forward + backward passes of ``fn`` over one packed row."""
    q, k, v = qkv(lens, device)
    torch.cuda.synchronize(device)
    began = time.perf_counter()
    for _ in range(layers):
        fn(q, k, v, lens).float().sum().backward()
    torch.cuda.synchronize(device)
    return time.perf_counter() - began


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--median", type=float, default=256.0)
    p.add_argument("--cap", type=int, default=4096)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--iterations", type=int, default=8)
    p.add_argument("--repeat", action="store_true", help="replay the first draw instead of new lengths")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type != "cuda" or not ragged.varlen_available():
        raise SystemExit("bench/attention_lengths.py needs CUDA and torch.nn.attention.varlen")
    rng = np.random.default_rng(0)
    draws = [draw(rng, args.tokens, args.median, args.cap) for _ in range(args.iterations + 1)]
    if args.repeat:
        draws = [draws[0]] * len(draws)
    q, k, v = qkv(draws[0][:1], device)
    print(f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, {torch.cuda.get_device_name(device)}: "
          f"SDPA's default backend for these shapes: {sdp_choice(q, k, v, is_causal=True)}; for the engine's "
          f"masked prefill (8 prompts of 300 tokens over the pool): {engine_prefill_choice(device)}")
    print(f"{args.iterations} micro-batches of ~{args.tokens} tokens ({'one draw replayed' if args.repeat else 'new lengths each'}), "
          f"{args.layers} layers forward + backward, mean {np.mean([len(d) for d in draws]):.0f} sequences each")
    ways = {"sdpa default": sdpa_default, "sdpa no cuDNN": sdpa_no_cudnn, "flash varlen": flash}
    for fn in ways.values():  # warm-up draw (first launches, the varlen kernel's load)
        micro_batch(fn, draws[0], 1, device)
    times = {name: [micro_batch(fn, d, args.layers, device) for d in draws[1:]] for name, fn in ways.items()}
    table("micro-batch", times)
    shapes = [(int(rng.integers(4, 65)), int(rng.integers(64, 1025))) for _ in range(args.iterations + 1)]
    if args.repeat:
        shapes = [shapes[0]] * len(shapes)
    print(f"the engine's masked prefill (gathered_sdpa), {args.layers} layers forward, batch and prompt length "
          f"{'replayed' if args.repeat else 'new each'} (rows 4-64, 64-1,024 tokens); without cuDNN SDPA picks "
          f"{engine_prefill_choice(device, no_cudnn=True)}")
    prefill_ways = {"sdpa default": False, "sdpa no cuDNN": True}
    for no_cudnn in prefill_ways.values():
        prefill(shapes[0], 1, device, no_cudnn)
    table("prefill", {name: [prefill(s, args.layers, device, no_cudnn) for s in shapes[1:]]
                      for name, no_cudnn in prefill_ways.items()})


def table(what: str, times: dict[str, list[float]]) -> None:
    base = float(np.mean(times["sdpa default"]))
    print(f"{'way':<14} {'ms / ' + what:>17} {'first':>9} {'median':>9}  vs sdpa default")
    for name, ts in times.items():
        mean = float(np.mean(ts))
        print(f"{name:<14} {1e3 * mean:>17.1f} {1e3 * ts[0]:>9.1f} {1e3 * float(np.median(ts)):>9.1f}  "
              f"{base / mean:.2f}x")


def prefill_inputs(rows: int, length: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    q = torch.randn(rows, HEADS, length, DIM, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(rows, GROUPS, length, DIM, device=device, dtype=torch.bfloat16) for _ in range(2))
    mask = torch.ones(length, length, device=device, dtype=torch.bool).tril().expand(rows, 1, length, length)
    return q, k, v, mask


def prefill(shape: tuple[int, int], layers: int, device: torch.device, no_cudnn: bool) -> float:
    """Seconds for ``layers`` masked SDPA calls of one prefill batch of ``shape`` = (rows, prompt length)."""
    q, k, v, mask = prefill_inputs(*shape, device)
    ctx = sdpa_kernel(ragged.PER_SEQUENCE_BACKENDS) if no_cudnn else contextlib.nullcontext()
    torch.cuda.synchronize(device)
    began = time.perf_counter()
    with torch.inference_mode(), ctx:
        for _ in range(layers):
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.cuda.synchronize(device)
    return time.perf_counter() - began


if __name__ == "__main__":
    main()
