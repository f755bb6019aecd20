"""A decode step's small ops: the fused Triton kernels against the Hugging Face modules they replace, same run.

The Qwen2.5-0.5B shape (hidden 896, 14 heads and 2 kv heads of 64, intermediate 4864, bf16), one token per
row. Per row count, each op computed both ways on the same inputs:

- ``add_rmsnorm``: ``residual + x`` then ``Qwen2RMSNorm`` vs :func:`~agentrl.engine.fused_ops.fused_add_rmsnorm`;
- ``silu_mul``: Qwen2MLP's ``act_fn(gate) * up`` vs :func:`~agentrl.engine.fused_ops.silu_mul`;
- ``rotary_qk``: HF's ``apply_rotary_pos_emb`` on q and k vs :func:`~agentrl.engine.fused_ops.rotary_qk` (in place);
- ``rotary_qk_to_pool``: the rotary plus the runner's ``kv[0][where] = k; kv[1][where] = v`` vs
  :func:`~agentrl.engine.fused_ops.rotary_qk_to_pool`;
- ``layer``: one decoder layer's small ops as the runner runs them (two add + norm, rotary and pool writes,
  SiLU and mul) vs the fused ops (two fused_add_rmsnorm, rotary_qk_to_pool, silu_mul).

On CUDA each way is captured as one CUDA graph of ``--layers`` calls (as many as a decode step holds) and
timed with CUDA events, median of ``--iters`` replays; each JSON row gives ms per step, the ratio HF / fused,
and the share of output elements whose bits differ between the two ways (0 when the fused kernels round where
HF rounds). ``--device cpu`` runs tiny sizes under Triton's interpreter (timings meaningless, the checks not).

    python bench/fused_ops.py --device cuda          # rows 64, 256, 512
    python bench/fused_ops.py --device cpu           # rows 2, 5 under the interpreter
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._timing import graph_time_ms

Outputs = Sequence[torch.Tensor]
Op = Callable[[], Outputs]


class Shape(NamedTuple):
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int


SHAPES = {"cuda": Shape(896, 14, 2, 64, 4864), "cpu": Shape(96, 6, 2, 16, 160)}


class Inputs(NamedTuple):
    """One decode step's tensors for a layer, and the HF modules whose weights both ways read."""

    norm: Any  # Qwen2RMSNorm
    act: Any  # Qwen2MLP's act_fn (SiLU)
    x: torch.Tensor  # [rows, hidden] a sublayer's output
    residual: torch.Tensor  # [rows, hidden]
    gate: torch.Tensor  # [rows, intermediate]
    up: torch.Tensor
    q: torch.Tensor  # [rows, heads, head_dim]
    k: torch.Tensor  # [rows, kv_heads, head_dim]
    v: torch.Tensor
    cos: torch.Tensor  # [rows, head_dim]
    sin: torch.Tensor
    kv: torch.Tensor  # [2, slots, kv_heads, head_dim] one layer of the pool
    where: torch.Tensor  # [rows] int64


def make_inputs(rows: int, shape: Shape, device: torch.device, dtype: torch.dtype) -> Inputs:
    from transformers import Qwen2Config
    from transformers.activations import ACT2FN
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm, Qwen2RotaryEmbedding

    gen = torch.Generator().manual_seed(rows)

    def randn(*size: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(size, generator=gen) * scale).to(device, dtype)

    norm = Qwen2RMSNorm(shape.hidden, eps=1e-6).to(device, dtype)
    norm.weight.data = randn(shape.hidden, scale=0.5) + 1
    cfg = Qwen2Config(hidden_size=shape.heads * shape.head_dim, num_attention_heads=shape.heads)
    positions = torch.randint(0, 4096, (rows, 1), generator=gen).to(device)
    cos, sin = Qwen2RotaryEmbedding(cfg).to(device)(torch.zeros(1, device=device, dtype=dtype), positions)
    slots = 4 * rows + 1
    return Inputs(
        norm, ACT2FN["silu"], randn(rows, shape.hidden, scale=3), randn(rows, shape.hidden),
        randn(rows, shape.intermediate, scale=3), randn(rows, shape.intermediate),
        randn(rows, shape.heads, shape.head_dim), randn(rows, shape.kv_heads, shape.head_dim),
        randn(rows, shape.kv_heads, shape.head_dim), cos[:, 0], sin[:, 0],
        torch.zeros((2, slots, shape.kv_heads, shape.head_dim), device=device, dtype=dtype),
        torch.randperm(slots, generator=gen)[:rows].to(device),
    )


def hf_ops(t: Inputs) -> dict[str, Op]:
    """The HF modules' way, as ModelRunner runs them today."""
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    def add_rmsnorm() -> Outputs:
        hidden = t.residual + t.x
        return t.norm(hidden), hidden

    def rotary() -> Outputs:
        q, k = apply_rotary_pos_emb(t.q.unsqueeze(2), t.k.unsqueeze(2), t.cos.unsqueeze(1), t.sin.unsqueeze(1))
        return q[:, :, 0], k[:, :, 0]

    def rotary_to_pool() -> Outputs:
        q, k = rotary()
        t.kv[0][t.where] = k
        t.kv[1][t.where] = t.v
        return q, t.kv

    def silu_mul() -> Outputs:
        return (t.act(t.gate) * t.up,)

    def layer() -> Outputs:
        return (*add_rmsnorm(), *rotary_to_pool(), *add_rmsnorm(), *silu_mul())

    return {"add_rmsnorm": add_rmsnorm, "silu_mul": silu_mul, "rotary_qk": rotary, "rotary_qk_to_pool": rotary_to_pool,
            "layer": layer}


def fused_ops(t: Inputs) -> dict[str, Op]:
    """The fused kernels, as a decode step would run them (q and k rotated in place)."""
    from agentrl.engine import fused_ops as ops

    def add_rmsnorm() -> Outputs:
        return ops.fused_add_rmsnorm(t.x, t.residual, t.norm.weight, t.norm.variance_epsilon)

    def rotary_to_pool() -> Outputs:
        return ops.rotary_qk_to_pool(t.q, t.k, t.v, t.cos, t.sin, t.kv, t.where), t.kv

    def silu_mul() -> Outputs:
        return (ops.silu_mul(t.gate, t.up),)

    def layer() -> Outputs:
        return (*add_rmsnorm(), *rotary_to_pool(), *add_rmsnorm(), *silu_mul())

    return {"add_rmsnorm": add_rmsnorm, "silu_mul": silu_mul, "rotary_qk": lambda: ops.rotary_qk(t.q, t.k, t.cos, t.sin),
            "rotary_qk_to_pool": rotary_to_pool, "layer": layer}


def mismatch(a: Outputs, b: Outputs) -> float:
    """The largest share of elements whose bits differ, over the outputs of the two ways."""
    return max(float((x != y).float().mean()) for x, y in zip(a, b, strict=True))


def measure(rows: int, args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    shape = SHAPES[device.type]

    def inputs() -> Inputs:  # identical each time (seeded by rows); the rotaries change q and k in place
        return make_inputs(rows, shape, device, args.dtype)

    out = []
    for name in hf_ops(inputs()):
        diff = mismatch(fused_ops(inputs())[name](), hf_ops(inputs())[name]())
        hf_ms = graph_time_ms(hf_ops(inputs())[name], args.layers, args.iters, device)
        fused_ms = graph_time_ms(fused_ops(inputs())[name], args.layers, args.iters, device)
        out.append({"op": name, "rows": rows, "layers": args.layers, "hf_ms": round(hf_ms, 4),
                    "fused_ms": round(fused_ms, 4), "x": round(hf_ms / fused_ms, 3), "mismatch": diff})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--rows", type=int, nargs="+", help="default: 64 256 512 (cuda), 2 5 (cpu)")
    parser.add_argument("--layers", type=int, help="calls per timed step; default: 24 (cuda), 1 (cpu)")
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if not cuda:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
        args.iters = min(args.iters, 2)
    args.rows = args.rows or ([64, 256, 512] if cuda else [2, 5])
    args.layers = args.layers or (24 if cuda else 1)
    args.dtype = torch.bfloat16
    device = torch.device(args.device)
    with torch.inference_mode():
        for rows in args.rows:
            for row in measure(rows, args, device):
                print(json.dumps(row), flush=True)
                print(f"x  rows={rows} {row['op']}: fused {row['fused_ms']} ms vs HF {row['hf_ms']} ms "
                      f"({row['x']}x) per {args.layers} layers, bits differ on {row['mismatch']:.2e}", flush=True)


if __name__ == "__main__":
    main()
