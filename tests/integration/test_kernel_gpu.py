"""Kernel evaluation on a real GPU: hand-written solutions are correct and timed with CUDA events against eager
PyTorch and torch.compile; work on a side stream is caught; a GPU that keeps failing its health check is taken
out of the pool. Skipped without CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from agentrl.env import Action
from agentrl.messages import ChatMessage, Task
from envs.kernelgen import KernelEnv
from envs.kernelgen.evaluate import EvalConfig, evaluate_solution
from envs.kernelgen.problem import load_problems

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

KG = Path(__file__).resolve().parents[2] / "envs" / "kernelgen"
PROBLEMS = {p.name: p for p in load_problems(KG / "problems")}
SIDE_STREAM = """
import torch
import triton
import triton.language as tl


@triton.jit
def relu_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.maximum(tl.load(x_ptr + offs, mask=mask), 0.0), mask=mask)


class ModelNew(torch.nn.Module):
    def forward(self, x):
        out = torch.empty_like(x)
        with torch.cuda.stream(torch.cuda.Stream()):  # escapes events recorded on the current stream
            relu_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK=1024)
        return out
"""


async def test_handwritten_solution_is_correct_and_timed_on_gpu() -> None:
    p = PROBLEMS["08_add_relu_mul"]
    r = await evaluate_solution(p.source, (KG / "solutions/08_add_relu_mul.py").read_text(),
                                EvalConfig(device="cuda", reps=10), settings=p.settings, gpu="0")
    assert r.outcome == "correct", r
    assert r.timing is not None and r.timing["solution_ms"] > 0 and r.speedup_eager is not None
    assert r.speedup_compile is not None or "compile_error" in r.timing


async def test_side_stream_is_caught_on_gpu() -> None:
    p = PROBLEMS["01_relu"]
    r = await evaluate_solution(p.source, SIDE_STREAM, EvalConfig(device="cuda", timing=False), gpu="0")
    assert r.outcome == "violation" and "side_stream" in [v["rule"] for v in r.violations]


async def test_env_on_gpu_rewards_speed() -> None:
    p = PROBLEMS["08_add_relu_mul"]
    env = KernelEnv(device="cuda", gpus=["0"], compile_baseline=False)
    await env.reset(Task(id="t", group_id="g", prompt=[ChatMessage(role="user", content="")], env="kernelgen",
                         env_args=p.env_args()))
    solution = (KG / "solutions/08_add_relu_mul.py").read_text()
    result = await env.step(Action(text=f"```python\n{solution}```"))
    assert result.info["correct"] and result.info["speedup_eager"] > 0
    assert result.reward == pytest.approx(0.3 + min(max(result.info["speedup_eager"] - 1, 0), 2))
