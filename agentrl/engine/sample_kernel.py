"""Two Triton kernels that sample a token per row straight from the float32 logits.

The unfused path (:func:`agentrl.engine.sampling.sample_on_device`) materialises ``log_softmax(logits / T)``,
its ``exp`` and cumulative sum — about seven passes over a ``[B, V]`` float32 tensor (V = 151,936 for Qwen2)
and a dozen kernels. Here each row's vocabulary is cut into S contiguous splits (S grows as the batch shrinks,
so a small batch still fills the GPU), and the logits are read about once:

1. one program per (row, split): an online max / sum of ``exp(logits / T)`` over the split and the split's
   argmax (first maximum);
2. one program per row: the splits combine into the log-normaliser ``logZ``, the row's argmax (greedy) and each
   split's probability mass; the row's uniform number falls into the first split whose cumulative mass reaches
   it, and that split alone is scanned for the first index where the running sum reaches the uniform (the
   inverse CDF, as in the unfused path; where rounding leaves a sum short of it, the last token with non-zero
   probability).

It writes the token, its logprob ``logits[token] / T - logZ`` and ``logZ`` (from which top-k and chosen-id
logprobs are read without a log-softmax). Rows with temperature <= 0 take the argmax with ``T = 1``.
Truncation (top-k / top-p / min-p) needs a sort and stays on the unfused path.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

__all__ = ["FusedSample", "fused_sample"]

_BLOCK = 2048
_PROGRAMS = 2048  # (row, split) programs to aim for in the first kernel
_MAX_SPLITS = 64
_kernels: Any = None


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
        chunk, splits = split_sizes(b, vocab)
        parts = torch.empty((4, b, splits), dtype=torch.float32, device=logits.device)  # max, sum, best, best index
        stats, pick = _compiled()
        stats[(b, splits)](logits, logits.stride(0), inv_t, parts, vocab, chunk, splits, BLOCK=_BLOCK)
        pick[(b,)](logits, logits.stride(0), inv_t, u, greedy.contiguous(), parts, tokens, logprobs, logz, vocab, chunk,
                   splits, SPLITS=max(triton_next_power_of_2(splits), 2), BLOCK=_BLOCK)
    return FusedSample(tokens, logprobs, logz, inv_t)


def split_sizes(rows: int, vocab: int) -> tuple[int, int]:
    """(tokens per split, a multiple of the block; splits per row): about ``_PROGRAMS`` programs in all."""
    want = min(_MAX_SPLITS, max(1, _cdiv(_PROGRAMS, rows)))
    chunk = _cdiv(_cdiv(vocab, want), _BLOCK) * _BLOCK
    return chunk, _cdiv(vocab, chunk)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def triton_next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _compiled() -> Any:
    global _kernels
    if _kernels is None:
        _kernels = _build()
    return _kernels


def _build() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def stats(logits, stride, inv_t_ptr, parts, vocab, chunk, splits, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        row, split = tl.program_id(0), tl.program_id(1)
        base = logits + row.to(tl.int64) * stride
        inv_t = tl.load(inv_t_ptr + row)
        offs = tl.arange(0, BLOCK)
        m = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), 0)
        s = tl.sum(tl.zeros([BLOCK], tl.float32), 0)
        best = m
        best_idx = tl.sum(tl.zeros([BLOCK], tl.int32), 0) + vocab
        first = split * chunk
        for start in range(0, chunk, BLOCK):
            idx = first + start + offs
            x = tl.load(base + idx, mask=idx < vocab, other=float("-inf"))
            block_best = tl.max(x, 0)
            block_idx = tl.min(tl.where(x == block_best, idx, vocab), 0)  # first maximum
            best_idx = tl.where(block_best > best, block_idx, best_idx)
            best = tl.maximum(best, block_best)
            y = x * inv_t
            m_new = tl.maximum(m, tl.max(y, 0))
            s = tl.where(m_new == float("-inf"), 0.0, s * tl.exp(m - m_new) + tl.sum(tl.exp(y - m_new), 0))
            m = m_new
        out = parts + row * splits + split
        plane = tl.num_programs(0) * splits
        tl.store(out, m)
        tl.store(out + plane, s)
        tl.store(out + 2 * plane, best)
        tl.store(out + 3 * plane, best_idx.to(tl.float32))  # exact: vocab < 2**24

    @triton.jit
    def pick(logits, stride, inv_t_ptr, u_ptr, greedy_ptr, parts, tokens, logprobs, logz_out, vocab, chunk,  # type: ignore[no-untyped-def]
             splits, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        base = logits + row.to(tl.int64) * stride
        inv_t = tl.load(inv_t_ptr + row)
        k = tl.arange(0, SPLITS)
        have = k < splits
        plane = tl.num_programs(0) * splits
        at = parts + row * splits + k
        m_k = tl.load(at, mask=have, other=float("-inf"))
        s_k = tl.load(at + plane, mask=have, other=0.0)
        best_k = tl.load(at + 2 * plane, mask=have, other=float("-inf"))
        idx_k = tl.load(at + 3 * plane, mask=have, other=0.0).to(tl.int32)
        m = tl.max(m_k, 0)
        logz = m + tl.log(tl.sum(tl.where(s_k > 0, s_k * tl.exp(m_k - m), 0.0), 0))
        best = tl.max(best_k, 0)
        best_idx = tl.min(tl.where(have & (best_k == best), idx_k, vocab), 0)  # splits run in vocabulary order
        mass = tl.where(s_k > 0, s_k * tl.exp(m_k - logz), 0.0)
        cum = tl.cumsum(mass, 0)
        target = tl.load(u_ptr + row)
        reached = tl.min(tl.where(have & (cum >= target), k, splits), 0)
        last_split = tl.max(tl.where(mass > 0, k, 0), 0)
        split = tl.where(reached < splits, reached, last_split)
        run = tl.sum(tl.where(k < split, mass, 0.0), 0)
        offs = tl.arange(0, BLOCK)
        token = best_idx * 0 + vocab  # none yet
        last = best_idx * 0  # last index of the split with non-zero probability
        first = split * chunk
        for start in range(0, chunk, BLOCK):
            idx = first + start + offs
            valid = idx < vocab
            x = tl.load(base + idx, mask=valid, other=float("-inf"))
            p = tl.where(valid, tl.exp(x * inv_t - logz), 0.0)
            c = tl.cumsum(p, 0) + run
            token = tl.minimum(token, tl.min(tl.where((c >= target) & valid, idx, vocab), 0))
            last = tl.maximum(last, tl.max(tl.where(p > 0, idx, 0), 0))
            run += tl.sum(p, 0)
        token = tl.where(token < vocab, token, last)
        token = tl.where(tl.load(greedy_ptr + row), best_idx, token).to(tl.int64)
        tl.store(tokens + row, token)
        tl.store(logprobs + row, tl.load(base + token) * inv_t - logz)
        tl.store(logz_out + row, logz)

    return stats, pick
