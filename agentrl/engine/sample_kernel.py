"""One Triton kernel that samples a token per row straight from the float32 logits.

The unfused path (:func:`agentrl.engine.sampling.sample_on_device`) materialises ``log_softmax(logits / T)``,
its ``exp`` and cumulative sum — about seven passes over a ``[B, V]`` float32 tensor (V = 151,936 for Qwen2)
and a dozen kernels. Here one program per row reads the logits twice:

1. an online max / sum of ``exp(logits / T)`` (the log-normaliser ``logZ``) and the row's argmax (greedy);
2. the running sum of ``exp(logits / T - logZ)`` block by block, stopping at the first index where it reaches
   the row's uniform number (the inverse CDF, as in the unfused path; where rounding leaves the sum short of
   it, the last token with non-zero probability).

It writes the token, its logprob ``logits[token] / T - logZ`` and ``logZ`` (from which top-k and chosen-id
logprobs are read without a log-softmax). Rows with temperature <= 0 take the argmax with ``T = 1``.
Truncation (top-k / top-p / min-p) needs a sort and stays on the unfused path.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

__all__ = ["FusedSample", "fused_sample"]

_BLOCK = 2048
_kernel: Any = None


class FusedSample(NamedTuple):
    tokens: torch.Tensor  # int64 [B]
    logprobs: torch.Tensor  # float32 [B]
    log_normalizer: torch.Tensor  # float32 [B]: logZ of logits / T
    inv_temperature: torch.Tensor  # float32 [B]: 1 / T (1 for greedy rows)


def fused_sample(logits: torch.Tensor, temperature: torch.Tensor, uniform: torch.Tensor) -> FusedSample:
    """Sample from ``softmax(logits / T)`` at ``uniform`` per row (float32 ``logits [B, V]``, all on one device)."""
    if logits.dim() != 2 or logits.dtype != torch.float32 or logits.stride(1) != 1:
        raise ValueError(f"logits must be a row-contiguous float32 [B, V] tensor, got {logits.dtype} {tuple(logits.shape)}")
    b, vocab = logits.shape
    if temperature.shape != (b,) or uniform.shape != (b,):
        raise ValueError(f"temperature and uniform must be [{b}], got {tuple(temperature.shape)}, {tuple(uniform.shape)}")
    greedy = temperature <= 0
    inv_t = torch.where(greedy, torch.ones_like(temperature), 1.0 / temperature).float().contiguous()
    u = torch.where(greedy, torch.zeros_like(uniform), uniform).float().contiguous()
    tokens = torch.empty(b, dtype=torch.long, device=logits.device)
    logprobs = torch.empty(b, dtype=torch.float32, device=logits.device)
    logz = torch.empty(b, dtype=torch.float32, device=logits.device)
    if b:
        _compiled()[(b,)](logits, logits.stride(0), inv_t, u, greedy.contiguous(), tokens, logprobs, logz, vocab,
                          BLOCK=_BLOCK)
    return FusedSample(tokens, logprobs, logz, inv_t)


def _compiled() -> Any:
    global _kernel
    if _kernel is None:
        _kernel = _build()
    return _kernel


def _build() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(logits, stride, inv_t_ptr, u_ptr, greedy_ptr, tokens, logprobs, logz_out, vocab, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        row = tl.program_id(0)
        base = logits + row.to(tl.int64) * stride
        inv_t = tl.load(inv_t_ptr + row)
        offs = tl.arange(0, BLOCK)
        m = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), 0)
        s = tl.sum(tl.zeros([BLOCK], tl.float32), 0)
        best = m
        best_idx = tl.sum(tl.zeros([BLOCK], tl.int64), 0)
        for start in range(0, vocab, BLOCK):
            idx = start + offs
            x = tl.load(base + idx, mask=idx < vocab, other=float("-inf"))
            block_best = tl.max(x, 0)
            block_idx = tl.min(tl.where(x == block_best, idx, vocab), 0).to(tl.int64)  # first maximum
            best_idx = tl.where(block_best > best, block_idx, best_idx)
            best = tl.maximum(best, block_best)
            y = x * inv_t
            m_new = tl.maximum(m, tl.max(y, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(y - m_new), 0)
            m = m_new
        logz = m + tl.log(s)
        target = tl.load(u_ptr + row)
        run = tl.sum(tl.zeros([BLOCK], tl.float32), 0)
        token = best_idx * 0 + vocab  # none yet
        last = best_idx * 0  # last index with non-zero probability
        for start in range(0, vocab, BLOCK):
            idx = start + offs
            valid = idx < vocab
            x = tl.load(base + idx, mask=valid, other=float("-inf"))
            p = tl.where(valid, tl.exp(x * inv_t - logz), 0.0)
            c = tl.cumsum(p, 0) + run
            first = tl.min(tl.where((c >= target) & valid, idx, vocab), 0).to(tl.int64)
            token = tl.minimum(token, first)
            last = tl.maximum(last, tl.max(tl.where(p > 0, idx, 0), 0).to(tl.int64))
            run += tl.sum(p, 0)
        token = tl.where(token < vocab, token, last)
        token = tl.where(tl.load(greedy_ptr + row), best_idx, token)
        tl.store(tokens + row, token)
        tl.store(logprobs + row, tl.load(base + token) * inv_t - logz)
        tl.store(logz_out + row, logz)

    return kernel
