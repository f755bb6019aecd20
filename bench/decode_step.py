"""Where a decode step's time goes, before and after the engine's kernels, same model, same run.

Builds the engine's :class:`~agentrl.engine.runner.ModelRunner` in process on a random model of ``--shape``
and times one decode step (forward + sampling) for each variant, adding one lever at a time:

- ``baseline``: the HF modules' small ops, attention over the gathered context (SDPA), the torch sampler;
- ``+attention``: the paged decode-attention kernel; ``+fused ops``: fused norm/activation/rotary kernels;
- ``all``: the above plus the fused sampler (the engine's default on CUDA).

Each step replays the runner's CUDA graph and samples; the mean over ``--steps`` steps is timed with CUDA
events. A profile of one eager step per variant (torch.profiler) counts its kernels and lists where the device
time goes. On CPU (``TRITON_INTERPRET=1``, tiny sizes) it runs so it cannot rot; the numbers mean nothing there.

    python -m bench.decode_step --device cuda                     # 0.5B shape, rows 64/256, mid-generation
    python -m bench.decode_step --device cuda --context 4096 --lengths longtail
"""

from __future__ import annotations

import argparse
import math
import random
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from agentrl.engine.runner import ModelRunner
from agentrl.engine.sampling import SamplingBatch, sample_on_device


@dataclass(frozen=True)
class Variant:
    name: str
    attention: bool
    fused_ops: bool
    sampler: bool


VARIANTS = [
    Variant("baseline", False, False, False),
    Variant("+attention", True, False, False),
    Variant("+fused ops", True, True, False),
    Variant("all (default)", True, True, True),
]


def build_model(shape: str, device: torch.device, dtype: torch.dtype) -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from bench.engine import SHAPES

    spec = SHAPES[shape]
    cfg = Qwen2Config(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.max_positions, tie_word_embeddings=spec.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def lengths(rows: int, context: int, kind: str) -> list[int]:
    """Each row's current length: ``mid`` (a 128-token prompt + 128 generated) or a long tail up to the context."""
    rng = random.Random(rows)
    if kind == "mid":
        return [min(256, context - 1)] * rows
    return [max(16, min(context - 1, int(rng.lognormvariate(math.log(384), 1.0)))) for _ in range(rows)]


def make_runner(model: Any, rows: int, context: int, lens: list[int], v: Variant, graphs: bool) -> ModelRunner:
    runner = ModelRunner(model, rows, context, rows * context, decode_kernel=v.attention, fused_ops=v.fused_ops)
    runner.set_rows(range(rows), [np.arange(r * context, r * context + n, dtype=np.int64) for r, n in enumerate(lens)])
    if graphs:
        runner.capture_cuda_graphs([rows])
    return runner


def sampling_params(rows: int, device: torch.device) -> SamplingBatch:
    sb = SamplingBatch.build([1.0] * rows, [1.0] * rows, [-1] * rows, [0.0] * rows, list(range(rows)), [9] * rows,
                             [[] for _ in range(rows)])
    for name in ("temperature", "top_p", "top_k", "min_p", "seed", "step"):
        setattr(sb, name, getattr(sb, name).to(device))
    return sb


def step_ms(runner: ModelRunner, tokens: torch.Tensor, positions: torch.Tensor, params: SamplingBatch,
            fused: bool, steps: int) -> float:
    def one() -> None:
        sample_on_device(runner.decode(tokens, positions), params, fused=fused)

    one()
    if tokens.is_cuda:
        torch.cuda.synchronize()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(steps):
            one()
        end.record()
        torch.cuda.synchronize()
        return begin.elapsed_time(end) / steps
    start = time.perf_counter()
    for _ in range(steps):
        one()
    return 1000 * (time.perf_counter() - start) / steps


def profile(runner: ModelRunner, tokens: torch.Tensor, positions: torch.Tensor, params: SamplingBatch,
            fused: bool, top: int) -> tuple[int, float, list[tuple[str, int, float]]]:
    """Kernels per eager step, their device ms, and the ``top`` kernels by device time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if tokens.is_cuda else [ProfilerActivity.CPU]
    with torch_profile(activities=activities) as prof:
        sample_on_device(runner._decode_eager(tokens, positions, None), params, fused=fused)
        if tokens.is_cuda:
            torch.cuda.synchronize()
    kernels = [e for e in prof.events() if (e.device_type.name == "CUDA") == tokens.is_cuda]
    if not tokens.is_cuda:
        kernels = [e for e in kernels if e.name.startswith("aten::") and not e.cpu_parent]
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name, []).append((e.device_time_total if tokens.is_cuda else e.cpu_time) / 1000)
    ranked = sorted(((n[:70], len(t), sum(t)) for n, t in by_name.items()), key=lambda r: -r[2])
    return len(kernels), sum(r[2] for r in ranked), ranked[:top]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", default=None, help="qwen2.5-0.5b on CUDA, small on CPU")
    p.add_argument("--rows", type=lambda s: [int(x) for x in s.split(",")], default=None)
    p.add_argument("--context", type=int, default=None, help="table width (engine context); default 400 (64 on CPU)")
    p.add_argument("--lengths", choices=["mid", "longtail"], default="mid")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--top", type=int, default=8)
    args = p.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    shape = args.shape or ("qwen2.5-0.5b" if gpu else "small")
    rows_list, context = args.rows or ([64, 256] if gpu else [4]), args.context or (400 if gpu else 64)
    steps = args.steps or (50 if gpu else 2)
    model = build_model(shape, device, torch.bfloat16 if gpu else torch.float32)
    print(f"shape={shape} device={device} context={context} lengths={args.lengths} steps={steps}")
    for rows in rows_list:
        lens = lengths(rows, context, args.lengths)
        tokens = torch.randint(10, 1000, (rows,), device=device)
        positions = torch.tensor([n - 1 for n in lens], device=device)
        params = sampling_params(rows, device)
        print(f"\nrows={rows}, mean length {sum(lens) / rows:.0f}, longest {max(lens)}")
        print(f"{'variant':>14} | {'ms/step':>8} | {'vs baseline':>11} | {'kernels':>7} | {'kernel ms (eager)':>17}")
        base, profiles = None, {}
        for v in VARIANTS:
            with torch.inference_mode():
                runner = make_runner(model, rows, context, lens, v, graphs=gpu)
                ms = step_ms(runner, tokens, positions, params, v.sampler, steps)
                count, kernel_ms, ranked = profile(runner, tokens, positions, params, v.sampler, args.top)
            base = base or ms
            profiles[v.name] = ranked
            print(f"{v.name:>14} | {ms:>8.3f} | {base / ms:>10.2f}x | {count:>7} | {kernel_ms:>17.3f}")
            del runner
            if gpu:
                torch.cuda.empty_cache()
        for name in (VARIANTS[0].name, VARIANTS[-1].name):
            print(f"  top kernels, {name}: " + "; ".join(f"{n} x{c} {t:.3f} ms" for n, c, t in profiles[name]))


if __name__ == "__main__":
    main()
