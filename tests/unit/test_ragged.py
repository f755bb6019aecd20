"""Ragged attention (agentrl.engine.ragged): a query sees its own sequence's keys up to its own position."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agentrl.engine import ragged

Q_LENS, K_LENS = [3, 1, 7, 5], [3, 9, 7, 12]  # equal counts (a fresh prompt) and prefix continuations


def _packed(dtype: torch.dtype, device: str) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(sum(Q_LENS), 4, 16, generator=gen, device=device, dtype=dtype)
    k, v = (torch.randn(sum(K_LENS), 2, 16, generator=gen, device=device, dtype=dtype) for _ in range(2))
    return q, k, v


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention written out: query i of a sequence with nq queries and nk keys is at position
    nk - nq + i and sees keys 0..that position of its own sequence; GQA repeats each key head."""
    out, qs, ks = [], 0, 0
    for nq, nk in zip(Q_LENS, K_LENS, strict=True):
        kk = k[ks : ks + nk].repeat_interleave(2, dim=1).float()
        vv = v[ks : ks + nk].repeat_interleave(2, dim=1).float()
        scores = torch.einsum("qhd,khd->hqk", q[qs : qs + nq].float(), kk) / math.sqrt(q.shape[-1])
        allowed = torch.arange(nk)[None, :] <= (nk - nq + torch.arange(nq))[:, None]
        scores = scores.masked_fill(~allowed.to(scores.device), float("-inf"))
        out.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vv))
        qs, ks = qs + nq, ks + nk
    return torch.cat(out)


def test_per_sequence_attention_matches_the_written_out_reference() -> None:
    q, k, v = _packed(torch.float32, "cpu")
    out = ragged.per_sequence(q, k, v, Q_LENS, K_LENS, None)
    torch.testing.assert_close(out, _reference(q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flash_varlen_aligns_the_causal_mask_to_the_bottom_right_on_gpu() -> None:
    """The engine's ragged prefill continues cached prefixes: fewer queries than keys. The flash varlen kernel
    must mask as the reference does (a top-left mask would hide most of the prefix)."""
    assert ragged.varlen_available()
    q, k, v = _packed(torch.bfloat16, "cuda")
    cu_q = torch.tensor([0, *torch.tensor(Q_LENS).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0, *torch.tensor(K_LENS).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    out = ragged.flash_varlen(q, k, v, cu_q, cu_k, max(Q_LENS), max(K_LENS), None)  # the kernel itself
    torch.testing.assert_close(out.float(), _reference(q, k, v), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out, ragged.per_sequence(q, k, v, Q_LENS, K_LENS, None), rtol=2e-2, atol=2e-2)
    assert ragged.flash_aligns_bottom_right(q.device, q.dtype)  # so the engine's prefill takes the kernel


def _fused_runner_diffs(model_dir: str) -> dict[str, float]:
    """Run in a subprocess under Triton's interpreter: the runner with the fused ops (the GPU default) prefills
    fresh prompts and then continues two of them, ragged and padded; each way's distance to the HF forward pass."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    from agentrl.engine.runner import ModelRunner

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rows, chunks = [0, 1, 2], [[5, 17, 33, 99, 100, 7, 8], [8, 9, 10], [11, 12, 13, 14, 15]]
    with torch.no_grad():
        hf = [model(torch.tensor([c])).logits[0, -1] for c in (*chunks, chunks[0] + [3, 4], chunks[2] + [6])]
    out = {}
    for ragged_prefill in (True, False):
        runner = ModelRunner(model, 4, 64, 300, fused_ops=True, decode_kernel=False, ragged_prefill=ragged_prefill)
        assert runner.fused_ops
        runner.set_rows(rows, [np.arange(r * 64, r * 64 + 64) for r in rows])
        first = runner.prefill(rows, chunks, [0, 0, 0]).logits
        more = runner.prefill([0, 2], [[3, 4], [6]], [7, 5]).logits  # continued from the cached prefixes
        got = torch.cat([first, more])
        out["ragged" if ragged_prefill else "padded"] = float((got - torch.stack(hf)).abs().max())
    return out


def test_ragged_prefill_with_the_fused_ops_matches_hf_under_the_interpreter(tiny_model_dir: Path) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, str(tiny_model_dir)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    diffs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert diffs["ragged"] < 1e-4 and diffs["padded"] < 1e-4, diffs


if __name__ == "__main__":
    print(json.dumps(_fused_runner_diffs(sys.argv[1])))
