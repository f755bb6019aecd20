"""The paged decode-attention kernel computes what gathering each row's keys and a softmax compute.

On CPU the kernel runs under Triton's interpreter, in one subprocess (``TRITON_INTERPRET`` must be set before
triton is imported, and another test of this worker may have imported it already): this file run as a script
checks every case and prints one JSON object, which the tests read. Pool slots that no row may read hold NaN,
so a kernel reading past a row's length (or an idle row) shows up as NaN. The GPU tests run the kernel
compiled, at the Qwen2.5-0.5B attention shape, and the runner's CUDA-graph decode against its SDPA path.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

CONTEXT = 400  # table width of the kernel cases
POOL = 2000
LENS = (0, 1, 64, 65, 127, 128, 299, 400)  # idle, one key, block boundaries, odd, the whole table


def _pools(kv_heads: int, dim: int, dtype: torch.dtype, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value pools as the runner holds them (views into one [layers, 2, P, KVH, D] tensor)."""
    kv = torch.randn((2, 2, POOL, kv_heads, dim), generator=gen).to(dtype)
    return kv[1, 0], kv[1, 1]


def _table(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A strided table (every other row of a wider one) whose unused slots point at pool slots holding NaN."""
    rows = len(LENS)
    perm = torch.randperm(POOL - 100, generator=gen)
    wide = torch.full((2 * rows, CONTEXT + 50), POOL - 1, dtype=torch.long)
    table = wide[::2, :CONTEXT]
    for b, n in enumerate(LENS):
        table[b, :n] = perm[b * CONTEXT // 2 : b * CONTEXT // 2 + n] if n else table[b, :0]
    table[3, :60] = table[2, :60]  # prefix sharing: rows 2 and 3 read the same first 60 slots
    unread = torch.arange(POOL - 100, POOL)
    return table, unread


def _kernel_case(heads: int, kv_heads: int, dim: int, dtype: torch.dtype, splits: int | None) -> dict[str, Any]:
    from agentrl.engine.decode_attention import paged_decode_attention, paged_decode_attention_reference

    gen = torch.Generator().manual_seed(heads * 1000 + dim + (splits or 0))
    k_pool, v_pool = _pools(kv_heads, dim, dtype, gen)
    table, unread = _table(gen)
    k_pool[unread], v_pool[unread] = float("nan"), float("nan")
    q = torch.randn((heads, len(LENS), dim), generator=gen).to(dtype).transpose(0, 1)  # strided [B, H, D]
    lens = torch.tensor(LENS, dtype=torch.int32)
    scale = dim**-0.5
    out = paged_decode_attention(q, k_pool, v_pool, table, lens, scale, num_splits=splits)
    ref = paged_decode_attention_reference(q, k_pool, v_pool, table, lens, scale)
    return {
        "case": f"heads={heads} kv_heads={kv_heads} dim={dim} {dtype} splits={splits}",
        "dtype": str(dtype).removeprefix("torch."),
        "max_err": float((out.float() - ref.float()).abs().max()),
        "idle_zero": bool((out[0] == 0).all()),
        "shape_ok": out.shape == q.shape and out.dtype == q.dtype,
    }


KERNEL_CASES = [  # (heads, kv_heads, head_dim, dtype, splits)
    (2, 2, 64, torch.float32, 1),
    (2, 2, 64, torch.float32, 3),
    (4, 2, 128, torch.float32, 2),
    (14, 2, 64, torch.float32, None),
    (14, 2, 64, torch.float32, 1),
    (14, 2, 128, torch.float32, 4),
    (6, 3, 80, torch.float32, 2),  # head_dim not a power of two
    (14, 2, 64, torch.bfloat16, 3),
    (4, 2, 128, torch.bfloat16, 1),
]


def _tiny_qwen2() -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=256, hidden_size=448, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=512)
    return Qwen2ForCausalLM(cfg).eval()


def _runner_case() -> dict[str, Any]:
    """Prefill three rows (one sharing another's prefix), decode greedily, prefill one-token chunks (the kernel
    serves those too): kernel vs gathered SDPA logits."""
    import numpy as np

    from agentrl.engine.runner import ModelRunner

    model = _tiny_qwen2()
    runners = [ModelRunner(model, 4, 256, 1000, decode_kernel=flag) for flag in (True, False)]
    prompts = [list(range(3, 73)), [9, 8, 7, 6, 5], list(range(10, 140))]
    slots = [np.arange(500, 756), np.arange(100, 356)[::-1].copy(), np.arange(0, 100), np.arange(760, 1000)]
    slots[2] = np.concatenate([slots[0][:60], np.arange(200, 396)])  # row 2 shares row 0's first 60 slots
    prompts[2][:60] = prompts[0][:60]
    errs, agree = [], True
    for runner in runners:
        runner.set_rows(range(4), slots)
    logits = [r.prefill([0, 1, 2], prompts, [0, 0, 0]).logits for r in runners]
    lengths = [len(p) for p in prompts]
    for step in range(6):
        tokens = logits[1].argmax(-1)  # the SDPA path's greedy tokens feed both
        idle = step % 3 == 1  # row 1 sits out some steps (scratch position, zero length)
        pos = torch.tensor([runners[0].scratch if idle and b == 1 else n for b, n in enumerate(lengths)])
        logits = [r.decode(tokens, pos, kv_len=max(lengths) + 1) for r in runners]
        live = [b for b in range(3) if not (idle and b == 1)]
        errs.append(float((logits[0][live] - logits[1][live]).abs().max()))
        agree &= bool(torch.equal(logits[0][live].argmax(-1), logits[1][live].argmax(-1)))
        lengths = [n + (b in live) for b, n in enumerate(lengths)]
    one = [r.prefill([2, 0], [[42], [43]], [lengths[2], lengths[0]]).logits for r in runners]  # one-token chunks
    errs.append(float((one[0] - one[1]).abs().max()))
    return {"max_err": max(errs), "argmax_agree": agree, "kernel_used": runners[0].decode_kernel}


def _main() -> None:
    torch.set_num_threads(1)
    cases = [_kernel_case(*c) for c in KERNEL_CASES]
    print(json.dumps({"kernel": cases, "runner": _runner_case()}))


@pytest.fixture(scope="module")
def interpreted() -> dict[str, Any]:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_kernel_matches_the_reference_under_the_interpreter(interpreted: dict[str, Any]) -> None:
    tolerance = {"float32": 2e-5, "bfloat16": 2e-2}
    for case in interpreted["kernel"]:
        assert case["max_err"] < tolerance[case["dtype"]], case  # NaN (an unread slot was read) fails too
        assert case["idle_zero"] and case["shape_ok"], case


def test_runner_decode_by_kernel_matches_gathered_sdpa(interpreted: dict[str, Any]) -> None:
    runner = interpreted["runner"]
    assert runner["kernel_used"]
    assert runner["max_err"] < 1e-4 and runner["argmax_agree"], runner


def test_the_benchmark_runs_on_cpu() -> None:
    bench = Path(__file__).resolve().parents[2] / "bench" / "decode_attention.py"
    cmd = [sys.executable, str(bench), "--device", "cpu", "--batches", "3", "--workloads", "longtail"]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert row["batch"] == 3 and row["max_abs_diff"] < 1e-5 and row["kernel_ms"] > 0


def test_wrong_inputs_are_clear_errors() -> None:
    from agentrl.engine.decode_attention import paged_decode_attention
    from agentrl.errors import EngineError

    q, pool = torch.zeros(2, 4, 64), torch.zeros(10, 2, 64)
    table, lens = torch.zeros(2, 8, dtype=torch.long), torch.ones(2, dtype=torch.int32)
    bad = {
        "k/v pools": (q, pool, torch.zeros(10, 2, 32), table, lens),
        "heads % kv_heads": (torch.zeros(2, 3, 64), pool, pool, table, lens),
        "dtypes": (q.half(), pool, pool, table, lens),
        "table must be int64": (q, pool, pool, table.int(), lens),
        "lens must be int32": (q, pool, pool, table, lens.long()),
        "contiguous along head_dim": (q, pool.transpose(0, 2).contiguous().transpose(0, 2), pool, table, lens),
    }
    for message, args in bad.items():
        with pytest.raises(EngineError, match=message):
            paged_decode_attention(*args, scale=0.1)
    for splits in (0, 1000):
        with pytest.raises(EngineError, match="num_splits"):
            paged_decode_attention(q, pool, pool, table, lens, 0.1, num_splits=splits)
    empty = paged_decode_attention(q[:0], pool, pool, table, lens[:0], 0.1)
    assert empty.shape == (0, 4, 64)


def test_splits_fill_the_device_and_never_depend_on_lengths() -> None:
    from agentrl.engine.decode_attention import MAX_SPLITS, default_num_splits

    cuda = torch.device("cuda")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("agentrl.engine.decode_attention._sm_count", lambda device: 132)
        assert default_num_splits(256, 2, 4097, cuda) == 2  # 512 programs, ~4 per SM
        assert default_num_splits(64, 2, 4097, cuda) == 5
        assert default_num_splits(1, 2, 4097, cuda) == 33  # a split spans at least two 64-key blocks
        assert default_num_splits(1, 2, 129, cuda) == 2
        assert default_num_splits(1, 2, 1 << 20, cuda) == MAX_SPLITS
        assert default_num_splits(1024, 2, 4097, cuda) == 1


def test_the_kernel_on_cpu_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    from agentrl.engine.runner import ModelRunner
    from agentrl.errors import EngineError

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = _tiny_qwen2()
    assert not ModelRunner(model, 2, 16, 32).decode_kernel  # CPU default: gathered SDPA
    with pytest.raises(EngineError, match="TRITON_INTERPRET"):
        ModelRunner(model, 2, 16, 32, decode_kernel=True)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("splits", [None, 1])
def test_kernel_matches_the_reference_on_gpu_in_bf16(dim: int, splits: int | None) -> None:
    """The Qwen2.5-0.5B attention shape, 64 rows of a 4,097-position context, long-tail lengths."""
    from agentrl.engine.decode_attention import paged_decode_attention, paged_decode_attention_reference

    gen = torch.Generator(device="cuda").manual_seed(dim)
    batch, heads, kv_heads, context, slots = 64, 14, 2, 4097, 140_000
    kv = torch.randn((2, slots, kv_heads, dim), device="cuda", generator=gen).to(torch.bfloat16)
    kv[:, -100:] = float("nan")  # what no row may read
    lens = (torch.rand(batch, device="cuda", generator=gen) ** 4 * context).int()
    lens[:4] = torch.tensor([0, 1, 64, context], dtype=torch.int32)
    table = torch.randint(0, slots - 100, (batch, context), device="cuda", generator=gen)
    table[torch.arange(context, device="cuda").view(1, -1) >= lens.view(-1, 1)] = slots - 1
    q = torch.randn((batch, heads, dim), device="cuda", generator=gen).to(torch.bfloat16)
    out = paged_decode_attention(q, kv[0], kv[1], table, lens, dim**-0.5, num_splits=splits)
    ref = paged_decode_attention_reference(q, kv[0], kv[1], table, lens, dim**-0.5)
    assert (out.float() - ref.float()).abs().max() < 2e-2
    assert (out[0] == 0).all()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_decode_by_kernel_matches_gathered_sdpa_on_gpu(dtype: torch.dtype) -> None:
    """Greedy decode through captured CUDA graphs: the kernel path's logits are the SDPA path's."""
    import numpy as np

    from agentrl.engine.runner import ModelRunner

    model = _tiny_qwen2().to("cuda", dtype)
    # one model each: a runner packs its model's q/k/v and gate/up parameters into its own tensors
    runners = [ModelRunner(m, 8, 512, 4096, decode_kernel=flag) for m, flag in ((model, True),
                                                                               (copy.deepcopy(model), False))]
    slots = np.random.default_rng(0).permutation(4096).reshape(8, 512)
    lengths = [3, 70, 130, 200, 257]
    prompts = [[(7 * b + 3 * i) % 256 for i in range(n)] for b, n in enumerate(lengths)]
    for runner in runners:
        runner.set_rows(range(8), list(slots))
        runner.capture_cuda_graphs([1, 2, 4])
    logits = [r.prefill(range(5), prompts, [0] * 5).logits for r in runners]
    for step in range(12):
        n = 3 if step % 4 == 3 else 5  # a smaller graph (4) now and then; rows 3 and 4 wait
        tokens = logits[1][:n].argmax(-1)  # the SDPA path's greedy tokens feed both
        pos = torch.tensor(lengths[:n], device="cuda")
        logits = [r.decode(tokens, pos) for r in runners]
        scale = float(logits[1].abs().max())
        assert float((logits[0] - logits[1]).abs().max()) <= (1e-3 if dtype == torch.float32 else 0.05 * scale)
        if dtype == torch.float32:
            assert torch.equal(logits[0].argmax(-1), logits[1].argmax(-1))
        lengths[:n] = [x + 1 for x in lengths[:n]]
        logits = [torch.cat([lg, torch.zeros(5 - n, lg.shape[1], device="cuda")]) for lg in logits]
    assert all(r.has_cuda_graphs for r in runners) and runners[0].decode_kernel


if __name__ == "__main__":
    _main()
