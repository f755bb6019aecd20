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


def fused_sample(logits: torch.Tensor, temperature: torch.Tensor, uniform: torch.Tensor | None = None, *,
                 seed: torch.Tensor | None = None, step: torch.Tensor | None = None) -> FusedSample:
    """Sample from ``softmax(logits / T)`` per row (float32 ``logits [B, V]``, float32 ``temperature [B]``, all on
    one device) at ``uniform [B]``, or at :func:`~agentrl.engine.sampling.hash_uniform` of int64 ``seed`` and
    ``step`` computed in the kernel (bit for bit the same numbers, without its dozen small kernels)."""
    if logits.dim() != 2 or logits.dtype != torch.float32 or logits.stride(1) != 1:
        raise ValueError(f"logits must be a row-contiguous float32 [B, V] tensor, got {logits.dtype} {tuple(logits.shape)}")
    b, vocab = logits.shape
    hashed = uniform is None
    draws = [seed, step] if hashed else [uniform]
    if temperature.shape != (b,) or temperature.dtype != torch.float32 or any(
            t is None or t.shape != (b,) for t in draws):
        raise ValueError(f"temperature (float32) and uniform, or seed and step, must be [{b}], got "
                         f"{temperature.dtype} {tuple(temperature.shape)}, {[None if t is None else tuple(t.shape) for t in draws]}")
    device = logits.device
    tokens = torch.empty(b, dtype=torch.long, device=device)
    out = torch.empty((3, b), dtype=torch.float32, device=device)  # logprob, logZ, 1 / T
    if b:
        from triton import next_power_of_2  # here: tests set TRITON_INTERPRET before triton loads

        chunk, splits = split_sizes(b, vocab)
        parts = torch.empty((4, b, splits), dtype=torch.float32, device=device)  # max, sum, best, best index
        first, second = (seed, step) if hashed else (uniform, uniform)
        stats, pick = _compiled()
        stats[(b, splits)](logits, logits.stride(0), temperature, parts, vocab, chunk, splits, BLOCK=_BLOCK)
        pick[(b,)](logits, logits.stride(0), temperature, first, second, parts, tokens, out, vocab, chunk, splits,
                   HASH=hashed, SPLITS=max(next_power_of_2(splits), 2), BLOCK=_BLOCK)
    return FusedSample(tokens, out[0], out[1], out[2])


def split_sizes(rows: int, vocab: int) -> tuple[int, int]:
    """(tokens per split, a multiple of the block; splits per row): about ``_PROGRAMS`` programs in all."""
    from triton import cdiv

    want = min(_MAX_SPLITS, max(1, cdiv(_PROGRAMS, rows)))
    chunk = cdiv(cdiv(vocab, want), _BLOCK) * _BLOCK
    return chunk, cdiv(vocab, chunk)


def _compiled() -> Any:
    global _kernels
    if _kernels is None:
        _kernels = _build()
    return _kernels


def _build() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def stats(logits, stride, temp_ptr, parts, vocab, chunk, splits, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        row, split = tl.program_id(0), tl.program_id(1)
        base = logits + row.to(tl.int64) * stride
        t = tl.load(temp_ptr + row)
        inv_t = tl.where(t <= 0, 1.0, tl.math.div_rn(1.0, tl.where(t <= 0, 1.0, t)))  # 1 / T rounded as torch's
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
    def pick(logits, stride, temp_ptr, first_ptr, second_ptr, parts, tokens, out, vocab, chunk, splits,  # type: ignore[no-untyped-def]
             HASH: tl.constexpr, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        base = logits + row.to(tl.int64) * stride
        t = tl.load(temp_ptr + row)
        greedy = t <= 0
        inv_t = tl.where(greedy, 1.0, tl.math.div_rn(1.0, tl.where(greedy, 1.0, t)))
        if HASH:  # first, second: seed and step. agentrl.engine.sampling.hash_uniform, the same int64 arithmetic
            h = tl.load(first_ptr + row) * -7046029254386353131 + tl.load(second_ptr + row) * -7723592293110705685
            h = h ^ (h >> 31)
            h = h * -4658895280553007687
            h = h ^ (h >> 29)
            h = h ^ (h >> 31)
            h = h * -7723592293110705685
            h = h ^ (h >> 29)
            h = (h >> 10) & 9007199254740991
            target = ((h.to(tl.float64) + 0.5) / 9007199254740992.0).to(tl.float32)
        else:  # first: the uniform
            target = tl.load(first_ptr + row)
        target = tl.where(greedy, 0.0, target)
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
        token = tl.where(greedy, best_idx, token).to(tl.int64)
        tl.store(tokens + row, token)
        b = tl.num_programs(0)
        tl.store(out + row, tl.load(base + token) * inv_t - logz)
        tl.store(out + b + row, logz)
        tl.store(out + 2 * b + row, inv_t)

    return stats, pick
