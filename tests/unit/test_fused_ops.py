"""The fused small-op kernels compute what the Hugging Face modules they replace compute, rounding included.

On CPU the kernels run under Triton's interpreter in one subprocess (``TRITON_INTERPRET`` must be set before
triton is imported, and another test of this worker may have imported it already): this file run as a script
checks every case against HF's own modules (Qwen2RMSNorm, Qwen2MLP's activation, apply_rotary_pos_emb) and
prints one JSON object the tests read. Each case reports the largest difference and the fraction of elements
whose bit pattern differs: in bfloat16 a kernel that rounds at other points than HF does (e.g. the norm's
weight multiplied before the cast) differs on many elements, while float32 rounding noise (a sum in another
order) moves a bf16 result only near a rounding boundary. The GPU test runs the compiled kernels in bf16 at the
Qwen2.5-0.5B shape.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ULP = {"float32": 2.0**-23, "bfloat16": 2.0**-8, "float16": 2.0**-11}  # half an ulp, relative (rounding)


def _compare(name: str, out: torch.Tensor, ref: torch.Tensor) -> dict[str, Any]:
    """Largest difference relative to the reference's largest magnitude, and the share of differing elements."""
    ok_shape = out.shape == ref.shape and out.dtype == ref.dtype
    diff = (out.float() - ref.float()).abs()
    scale = float(ref.float().abs().max()) or 1.0
    return {
        "case": name, "dtype": str(ref.dtype).removeprefix("torch."), "shape_ok": ok_shape,
        "rel_err": float(diff.max()) / scale if diff.numel() else 0.0,
        "mismatch": float((out != ref).float().mean()) if diff.numel() else 0.0,
    }


def _norm_cases(dtype: torch.dtype, gen: torch.Generator) -> list[dict[str, Any]]:
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    from agentrl.engine.fused_ops import add_rmsnorm_reference, fused_add_rmsnorm

    cases = []
    shapes = [(896, (33,), True), (896, (1,), False), (80, (4, 1), True), (80, (5,), False),
              (64, (3, 14), False)]  # the last: Qwen3's q_norm over each head of q [rows, heads, head_dim]
    for hidden, shape, with_residual in shapes:
        norm = Qwen2RMSNorm(hidden, eps=1e-6)
        norm.weight.data = torch.randn(hidden, generator=gen) * 0.5 + 1
        norm.to(torch.float32 if hidden == 80 and with_residual else dtype)  # float32 weights: a float32 output
        x = (torch.randn((*shape, hidden), generator=gen) * 3).to(dtype)
        residual = torch.randn((*shape, hidden), generator=gen).to(dtype) if with_residual else None
        hf_residual = x if residual is None else residual + x  # the runner's `residual + attention(...)`
        normed, new_residual = fused_add_rmsnorm(x, residual, norm.weight, norm.variance_epsilon)
        name = f"rmsnorm hidden={hidden} rows={shape} residual={with_residual} {dtype}"
        cases.append(_compare(name, normed, norm(hf_residual)))
        cases.append(_compare(name + " new_residual", new_residual, hf_residual))
        cases.append(_compare(name + " reference", add_rmsnorm_reference(x, residual, norm.weight, 1e-6)[0],
                              norm(hf_residual)))
    return cases


def _silu_cases(dtype: torch.dtype, gen: torch.Generator) -> list[dict[str, Any]]:
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

    from agentrl.engine.fused_ops import silu_mul, silu_mul_reference

    cases = []
    for width, rows in [(4864, 1), (4864, 9), (80, 17), (1100, 3)]:
        mlp = Qwen2MLP(Qwen2Config(hidden_size=64, intermediate_size=width, hidden_act="silu")).to(dtype)
        x = torch.randn((rows, 1, 64), generator=gen).to(dtype)
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        hf = mlp.act_fn(gate) * up  # what Qwen2MLP.forward feeds down_proj
        name = f"silu_mul width={width} rows={rows} {dtype}"
        cases.append(_compare(name, silu_mul(gate, up), hf))
        cases.append(_compare(name + " gate_up", silu_mul(torch.cat([gate, up], dim=-1)), hf))
        cases.append(_compare(name + " reference", silu_mul_reference(gate, up), hf))
    return cases


def _cos_sin(rows: int, dim: int, dtype: torch.dtype, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's rotary embedding output for ``rows`` random positions, ``[rows, dim]`` each."""
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    cfg = Qwen2Config(hidden_size=dim * 4, num_attention_heads=4)
    positions = torch.randint(0, 32768, (rows, 1), generator=gen)
    cos, sin = Qwen2RotaryEmbedding(cfg)(torch.zeros(1, dtype=dtype), positions)
    return cos[:, 0], sin[:, 0]


def _rotary_cases(dtype: torch.dtype, gen: torch.Generator) -> list[dict[str, Any]]:
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    from agentrl.engine.fused_ops import rotary_qk, rotary_qk_reference, rotary_qk_to_pool

    cases = []
    for heads, kv_heads, dim, rows in [(14, 2, 64, 1), (14, 2, 64, 19), (6, 3, 80, 5), (4, 4, 128, 2)]:
        cos, sin = _cos_sin(rows, dim, dtype, gen)
        qkv = torch.randn((rows, (heads + 2 * kv_heads) * dim), generator=gen).to(dtype)  # one fused projection
        q, k, v = (t.view(rows, -1, dim) for t in qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=1))
        hf_q, hf_k = (t[:, :, 0] for t in apply_rotary_pos_emb(q.unsqueeze(2), k.unsqueeze(2), cos.unsqueeze(1), sin.unsqueeze(1)))
        name = f"rotary heads={heads}/{kv_heads} dim={dim} rows={rows} {dtype}"
        ref_q, ref_k = rotary_qk_reference(q, k, cos, sin)
        cases += [_compare(name + " reference q", ref_q, hf_q), _compare(name + " reference k", ref_k, hf_k)]
        kv = torch.full((2, rows + 3, kv_heads, dim), float("nan"), dtype=dtype)
        where = torch.randperm(rows + 3, generator=gen)[:rows]
        k_before = k.clone()
        pool_q = rotary_qk_to_pool(q.clone(), k, v, cos, sin, kv, where)
        cases += [_compare(name + " pool q", pool_q, hf_q), _compare(name + " pool k", kv[0][where], hf_k),
                  _compare(name + " pool v", kv[1][where], v), _compare(name + " pool leaves k", k, k_before)]
        untouched = torch.ones(rows + 3, dtype=torch.bool)
        untouched[where] = False
        cases.append({"case": name + " pool writes only where", "dtype": "float32", "shape_ok": True, "mismatch": 0.0,
                      "rel_err": 0.0 if bool(kv[:, untouched].isnan().all()) else 1.0})
        rotary_qk(q, k, cos, sin)  # in place, through the strided views of qkv
        cases += [_compare(name + " q", q, hf_q), _compare(name + " k", k, hf_k)]
    return cases


def _tiny_layers(dtype: torch.dtype) -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=448, intermediate_size=1000, num_hidden_layers=2,
                      num_attention_heads=14, num_key_value_heads=2)
    model = Qwen2ForCausalLM(cfg).eval().to(dtype)
    for p in model.parameters():  # norms away from 1, so a wrongly placed weight product shows
        p.data.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())).to(dtype) * 0.05)
    return model


def _self_attention(layer: Any, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention of a row at position 0 (its only key is itself): each head's output is its kv head's value."""
    group = q.shape[1] // v.shape[1]
    return layer.self_attn.o_proj(v.repeat_interleave(group, dim=1).reshape(q.shape[0], -1))


def _layers_case(dtype: torch.dtype) -> dict[str, Any]:
    """Two decoder layers at position 0: the runner's composition of HF modules vs the fused ops."""
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    from agentrl.engine.fused_ops import fused_add_rmsnorm, rotary_qk, silu_mul

    model = _tiny_layers(dtype)
    decoder, rows, dim = model.model, 7, 32
    hidden = decoder.embed_tokens(torch.arange(rows) * 9)
    cos, sin = decoder.rotary_emb(hidden, torch.full((rows, 1), 5))
    cos, sin = cos[:, 0], sin[:, 0]

    def qkv(layer: Any, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        attn = layer.self_attn
        return tuple(p(x).view(rows, -1, dim) for p in (attn.q_proj, attn.k_proj, attn.v_proj))

    h = hidden
    for layer in decoder.layers:  # as ModelRunner._forward / _attention compose them
        q, k, v = qkv(layer, layer.input_layernorm(h))
        q, k = (t[:, :, 0] for t in apply_rotary_pos_emb(q.unsqueeze(2), k.unsqueeze(2), cos.unsqueeze(1), sin.unsqueeze(1)))
        h = h + _self_attention(layer, q, v)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    x, residual = hidden, None
    for layer in decoder.layers:  # the fused ops, weights read from the modules at call time
        ln1, ln2, mlp = layer.input_layernorm, layer.post_attention_layernorm, layer.mlp
        x, residual = fused_add_rmsnorm(x, residual, ln1.weight, ln1.variance_epsilon)
        q, k, v = qkv(layer, x)
        rotary_qk(q, k, cos, sin)
        x, residual = fused_add_rmsnorm(_self_attention(layer, q, v), residual, ln2.weight, ln2.variance_epsilon)
        x = mlp.down_proj(silu_mul(mlp.gate_proj(x), mlp.up_proj(x)))
    return _compare(f"two decoder layers {dtype}", residual + x, h)


def _runner_cases(dtype: torch.dtype) -> list[dict[str, Any]]:
    """The engine's runner with the fused ops vs the HF modules: prefill, a prefix shared by another row, decode
    steps with an idle row; logits and the whole KV pool (the fused rotary writes keys/values into it itself)."""
    import numpy as np

    from agentrl.engine.runner import ModelRunner

    model = _tiny_layers(dtype)
    for i, layer in enumerate(model.model.layers):  # every norm its own weights (the seeded noise repeats per size)
        layer.post_attention_layernorm.weight.data.add_(0.1 * (i + 1))
        model.model.norm.weight.data.sub_(0.05)
    runners = [ModelRunner(model, 3, 32, 200, decode_kernel=False, fused_ops=flag) for flag in (True, False)]
    outs: list[list[torch.Tensor]] = [[], []]
    for runner, out in zip(runners, outs, strict=True):
        runner.set_rows([0, 2], [np.arange(100, 120), np.concatenate([np.arange(100, 106), np.arange(150, 164)])])
        out.append(runner.prefill([0], [[5, 17, 33, 40, 2, 9, 11]], [0]).logits)
        out.append(runner.prefill([2], [[8, 1]], [6]).logits)  # row 2 reuses row 0's first 6 positions
        for step in range(3):
            pos = torch.tensor([7 + step, runner.scratch, 8 + step])
            out.append(runner.decode(torch.tensor([3 + step, 0, 4 + step]), pos, kv_len=12))
        assert runner.kv is not None
        out.append(runner.kv[:, :, :200])
    names = ["prefill logits", "prefix-sharing prefill logits", *(f"decode {i} logits" for i in range(3)), "kv pool"]
    assert runners[0].fused_ops and not runners[1].fused_ops
    return [_compare(f"runner {name} {dtype}", a, b) for name, a, b in zip(names, *outs, strict=True)]


def _main() -> None:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    cases: list[dict[str, Any]] = []
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            cases += _norm_cases(dtype, gen) + _silu_cases(dtype, gen) + _rotary_cases(dtype, gen)
            cases.append(_layers_case(dtype))
            cases += _runner_cases(dtype)
        cases += _norm_cases(torch.float16, gen)[:1] + _silu_cases(torch.float16, gen)[:1]
    print(json.dumps(cases))


def _compile_for_sm90() -> list[str]:
    """Compile every kernel variant the wrappers launch at the 0.5B shape for an H100/H200 (sm_90), no GPU needed."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from agentrl.engine import fused_ops as ops

    compiled = []

    def build(fn: Any, pointers: dict[str, str], constants: dict[str, Any], num_warps: int) -> None:
        scalars = {name: "fp32" if name == "eps" else "i32" for name in fn.arg_names}  # shapes and strides
        signature = {name: pointers.get(name) or ("constexpr" if name in constants else scalars[name])
                     for name in fn.arg_names}
        kernel = triton.compile(ASTSource(fn, signature, constants), target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": num_warps, **ops.LAUNCH_OPTIONS})  # as launched
        fused = re.findall(r"\bfma\.[a-z0-9.]+", kernel.asm["ptx"])  # a product added unrounded: not HF's bits
        compiled.append(f"{fn.__name__} {constants} {len(kernel.asm['ptx'])} fma={sorted(set(fused))}")

    for t in ("bf16", "fp32"):
        for residual in (True, False):
            build(ops._add_rmsnorm_kernel, dict.fromkeys(["X", "R", "W", "Out", "NewR"], f"*{t}"),
                  {"HAS_RESIDUAL": residual, "BLOCK": 1024, "RTNE_IN": False, "RTNE_OUT": False}, 4)
        build(ops._silu_mul_kernel, dict.fromkeys(["G", "U", "Out"], f"*{t}"), {"BLOCK": 1024, "RTNE": False}, 4)
        for to_pool in (True, False):
            pointers = dict.fromkeys(["Q", "K", "V", "Cos", "Sin", "KOut", "VOut"], f"*{t}")
            build(ops._rotary_kernel, {**pointers, "Where": "*i64" if to_pool else f"*{t}"},
                  {"HALF": 32, "HALF_PAD": 32, "QH_PAD": 16, "KH_PAD": 2, "TO_POOL": to_pool, "RTNE": False}, 2)
    return compiled


@pytest.fixture(scope="module")
def interpreted() -> list[dict[str, Any]]:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: list[dict[str, Any]] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _close(case: dict[str, Any], *, mismatch: float) -> bool:
    """Right shape and dtype, within a few roundings' worth of the largest value, few elements differing."""
    return bool(case["shape_ok"] and case["rel_err"] <= 8 * ULP[case["dtype"]] and case["mismatch"] <= mismatch)


def _check_close(case: dict[str, Any], *, mismatch: float) -> None:
    assert _close(case, mismatch=mismatch), case


# Share of elements allowed to differ in their last bit: float32 noise (rsqrt, exp, a sum in another order)
# crosses a rounding boundary of the model dtype this rarely; rounding at other points than HF differs far more.
BOUNDARY_FLIPS = {"bfloat16": 1e-4, "float16": 1e-3, "float32": 1.0}


def test_bf16_and_fp16_match_the_hf_modules_bit_for_bit_under_the_interpreter(
    interpreted: list[dict[str, Any]],
) -> None:
    half = [c for c in interpreted if c["dtype"] != "float32"]
    assert len(half) > 40
    for case in half:
        _check_close(case, mismatch=BOUNDARY_FLIPS[case["dtype"]])


def test_float32_matches_the_hf_modules_to_rounding(interpreted: list[dict[str, Any]]) -> None:
    full = [c for c in interpreted if c["dtype"] == "float32"]
    assert len(full) > 40
    for case in full:
        _check_close(case, mismatch=BOUNDARY_FLIPS["float32"])


def test_the_benchmark_runs_on_cpu() -> None:
    bench = Path(__file__).resolve().parents[2] / "bench" / "fused_ops.py"
    cmd = [sys.executable, str(bench), "--device", "cpu"]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert {r["op"] for r in rows} == {"add_rmsnorm", "silu_mul", "rotary_qk", "rotary_qk_to_pool", "layer"}
    assert all(r["fused_ms"] > 0 and r["hf_ms"] > 0 and r["mismatch"] == 0.0 for r in rows), rows


def _bad_calls() -> dict[str, Any]:
    from agentrl.engine import fused_ops as ops

    x, w = torch.zeros(3, 8), torch.ones(8)
    q, k, cs = torch.zeros(3, 4, 8), torch.zeros(3, 2, 8), torch.zeros(3, 8)
    kv, where = torch.zeros(2, 10, 2, 8), torch.zeros(3, dtype=torch.long)
    return {
        "x \\[..., hidden\\] and weight \\[hidden\\]": lambda: ops.fused_add_rmsnorm(x, None, torch.ones(7), 1e-6),
        "x and residual must have one shape": lambda: ops.fused_add_rmsnorm(x, torch.zeros(2, 8), w, 1e-6),
        "x and residual must have one dtype": lambda: ops.fused_add_rmsnorm(x, x.half(), w, 1e-6),
        "x must be contiguous": lambda: ops.fused_add_rmsnorm(torch.zeros(8, 3).t(), None, torch.ones(8), 1e-6),
        "x must be float16, bfloat16 or float32": lambda: ops.fused_add_rmsnorm(x.long(), None, w, 1e-6),
        "gate and up must have one shape": lambda: ops.silu_mul(x, torch.zeros(3, 4)),
        "up must be contiguous": lambda: ops.silu_mul(torch.zeros(3, 3), torch.zeros(3, 3).t()),
        "an even last dimension": lambda: ops.silu_mul(torch.zeros(3, 5)),
        "q \\[rows, heads, head_dim\\]": lambda: ops.rotary_qk(q, torch.zeros(3, 2, 6), cs, cs),
        "an even head_dim": lambda: ops.rotary_qk(torch.zeros(3, 4, 7), torch.zeros(3, 2, 7), cs[:, :7], cs[:, :7]),
        "cos and sin \\[rows, head_dim\\]": lambda: ops.rotary_qk(q, k, cs.unsqueeze(1), cs.unsqueeze(1)),
        "q, k, cos and sin must have one dtype": lambda: ops.rotary_qk(q, k, cs.bfloat16(), cs.bfloat16()),
        "q must be contiguous along head_dim": lambda: ops.rotary_qk(torch.zeros(3, 8, 4).transpose(1, 2), k, cs, cs),
        "kv must be one layer of the pool": lambda: ops.rotary_qk_to_pool(q, k, k, cs, cs, kv[0], where),
        "where must be int64 \\[3\\]": lambda: ops.rotary_qk_to_pool(q, k, k, cs, cs, kv, where.int()),
        "v must have k's shape": lambda: ops.rotary_qk_to_pool(q, k, q, cs, cs, kv, where),
    }


def test_wrong_inputs_are_clear_errors() -> None:
    from agentrl.errors import EngineError

    for message, call in _bad_calls().items():
        with pytest.raises(EngineError, match=message):
            call()


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("rows", [1, 256])
def test_kernels_match_the_hf_modules_on_gpu_in_bf16(rows: int) -> None:
    """The Qwen2.5-0.5B shape (hidden 896, 14/2 heads of 64, intermediate 4864), compiled kernels."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm, apply_rotary_pos_emb

    from agentrl.engine.fused_ops import fused_add_rmsnorm, rotary_qk, rotary_qk_to_pool, silu_mul

    torch.manual_seed(rows)
    bf16, dev = torch.bfloat16, "cuda"
    norm = Qwen2RMSNorm(896, 1e-6).to(dev, bf16).requires_grad_(False)
    norm.weight.data = torch.randn(896, device=dev).to(bf16) * 0.5 + 1
    x, residual = (torch.randn(rows, 896, device=dev) * 3).to(bf16), torch.randn(rows, 896, device=dev).to(bf16)
    normed, new_residual = fused_add_rmsnorm(x, residual, norm.weight, norm.variance_epsilon)
    checks = [(normed, norm(residual + x)), (new_residual, residual + x)]
    gate, up = (torch.randn(rows, 4864, device=dev) * 3).to(bf16), torch.randn(rows, 4864, device=dev).to(bf16)
    checks.append((silu_mul(gate, up), torch.nn.functional.silu(gate) * up))
    cos, sin = _cos_sin(rows, 64, bf16, torch.Generator().manual_seed(rows))
    cos, sin = cos.to(dev), sin.to(dev)
    q, k, v = (torch.randn(rows, h, 64, device=dev).to(bf16) for h in (14, 2, 2))
    hf_q, hf_k = (t[:, :, 0] for t in apply_rotary_pos_emb(q.unsqueeze(2), k.unsqueeze(2), cos.unsqueeze(1), sin.unsqueeze(1)))
    kv, where = torch.zeros(2, 4 * rows, 2, 64, device=dev, dtype=bf16), torch.randperm(4 * rows, device=dev)[:rows]
    checks += [(rotary_qk_to_pool(q.clone(), k, v, cos, sin, kv, where), hf_q), (kv[0][where], hf_k), (kv[1][where], v)]
    checks += list(zip(rotary_qk(q, k, cos, sin), (hf_q, hf_k), strict=True))
    names = ["add+rmsnorm", "new residual", "silu*up", "rotary q (to pool)", "k in pool", "v in pool",
             "rotary q", "rotary k"]
    cases = [_compare(name, out, ref) for name, (out, ref) in zip(names, checks, strict=True)]
    assert all(_close(case, mismatch=1e-3) for case in cases), cases  # every case: which kernels round differently


def test_every_kernel_compiles_for_sm90() -> None:
    """What the interpreter cannot show: the kernels lower to PTX for the H100/H200 (Triton's own ptxas)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__, "sm90"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kernels = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(kernels) == 10 and all(k.endswith("fma=[]") for k in kernels), kernels


if __name__ == "__main__":
    if sys.argv[1:] == ["sm90"]:
        print(json.dumps(_compile_for_sm90()))
    else:
        _main()
