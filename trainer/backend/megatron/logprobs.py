"""Per-token logprobs and entropy from vocabulary-parallel logits, never gathering the full vocabulary.

Each TP rank holds logits for its slice of the (padded) vocabulary, ``[T, V/tp]``. The softmax statistics
are combined with three all-reduces of ``[T]`` vectors (max, then sum of exponentials and the target's
logit and the sum of ``p·x`` together), so no rank sees more than its own slice. Only the model's logits
(in their own dtype) are kept for the backward pass; the float32 softmax is recomputed there, in row
chunks, and never stored. Columns past the true vocabulary (TP padding) are excluded.

Token ``t`` is scored by row ``t - 1`` divided by ``temperature[t]``: the distribution it was sampled from.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["VocabSlice", "packed_logprobs", "vocab_parallel_logprobs"]

_CHUNK = 4096  # rows of [tokens, vocab/tp] in float32 at a time


class VocabSlice:
    """Which columns of the vocabulary this rank's logits hold, and the group that holds the rest."""

    def __init__(self, start: int, valid: int, group: Any = None) -> None:
        self.start = start  # global id of local column 0
        self.valid = valid  # local columns that are real vocabulary (the rest is TP padding)
        self.group = group  # the tensor-parallel process group (None: the whole vocabulary is local)

    def all_reduce(self, t: torch.Tensor, op: Any = None) -> torch.Tensor:
        if self.group is not None and dist.get_world_size(self.group) > 1:
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM, group=self.group)
        return t


def _scaled(rows: torch.Tensor, temp: torch.Tensor | None, valid: int) -> torch.Tensor:
    x = rows[:, :valid].float()
    return x / temp[:, None] if temp is not None else x


def _chunks(n: int) -> list[slice]:
    return [slice(i, min(i + _CHUNK, n)) for i in range(0, n, _CHUNK)]


def _forward_stats(logits: torch.Tensor, targets: torch.Tensor, temp: torch.Tensor | None,
                   vs: VocabSlice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n = logits.shape[0]
    local = targets - vs.start
    inside = (local >= 0) & (local < vs.valid)
    idx = local.clamp(0, max(vs.valid - 1, 0))[:, None]
    m = logits[:, : vs.valid].max(-1).values.float()  # in the logits' own dtype: no float32 copy
    if temp is not None:
        m = m / temp  # temperatures are positive: max(x / t) = max(x) / t
    m = vs.all_reduce(m, dist.ReduceOp.MAX)
    stats = torch.zeros(3, n, dtype=torch.float32, device=logits.device)  # sum e^z, z_target, sum e^z·z
    for c in _chunks(n):
        z = _scaled(logits[c], None if temp is None else temp[c], vs.valid) - m[c, None]
        e = z.exp()
        stats[0, c] = e.sum(-1)
        stats[1, c] = z.gather(-1, idx[c]).squeeze(-1) * inside[c]
        stats[2, c] = (e * z).sum(-1)
    stats = vs.all_reduce(stats)
    log_s = stats[0].log()
    return m, log_s, stats[1] - log_s, log_s - stats[2] / stats[0]


class _VocabParallelLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor, temp: torch.Tensor | None,
                vs: VocabSlice) -> tuple[torch.Tensor, torch.Tensor]:
        m, log_s, logp, entropy = _forward_stats(logits, targets, temp, vs)
        ctx.save_for_backward(logits, targets, temp, m, log_s, entropy)
        ctx.vs = vs
        return logp, entropy

    @staticmethod
    def backward(ctx: Any, g_logp: torch.Tensor, g_ent: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        logits, targets, temp, m, log_s, entropy = ctx.saved_tensors
        vs: VocabSlice = ctx.vs
        grad = torch.zeros_like(logits)
        local = targets - vs.start
        inside = (local >= 0) & (local < vs.valid)
        for c in _chunks(logits.shape[0]):
            t = None if temp is None else temp[c]
            logq = _scaled(logits[c], t, vs.valid) - m[c, None] - log_s[c, None]  # log p
            p = logq.exp()
            # d logp_target / dx = onehot - p ;  d H / dx = -p (log p + H)
            g = -p * (g_logp[c, None] + g_ent[c, None] * (logq + entropy[c, None]))
            rows = torch.nonzero(inside[c]).squeeze(-1)
            g[rows, local[c][rows]] += g_logp[c][rows]
            if t is not None:
                g = g / t[:, None]
            grad[c, : vs.valid] = g.to(grad.dtype)
        return grad, None, None, None


def vocab_parallel_logprobs(logits: torch.Tensor, targets: torch.Tensor, vs: VocabSlice,
                            temperature: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logprob of ``targets`` ``[N]`` (global ids) and entropy under each row of ``logits`` ``[N, V/tp]``.

    Both are float32 ``[N]`` and differentiable with respect to ``logits`` (the entropy's gradient is used
    only when a loss asks for it). ``temperature`` ``[N]`` divides each row first.
    """
    if temperature is not None:
        temperature = temperature.to(device=logits.device, dtype=torch.float32)
    out: tuple[torch.Tensor, torch.Tensor] = _VocabParallelLogprob.apply(logits, targets, temperature, vs)
    return out


def packed_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, seq_starts: torch.Tensor, vs: VocabSlice,
                    temperature: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`trainer.packing.token_logprobs` for vocab-parallel logits: ``[T]`` logprobs and entropies.

    ``logits`` ``[T, V/tp]`` of a packed row, ``input_ids`` ``[T]``, ``seq_starts`` bool ``[T]``; token ``t``
    is scored by row ``t - 1``; each sequence's first token gets 0.
    """
    temp = None if temperature is None else temperature[1:]
    logp, ent = vocab_parallel_logprobs(logits[:-1], input_ids[1:], vs, temp)
    zero = logp.new_zeros(1)
    return (torch.cat([zero, logp]).masked_fill(seq_starts, 0.0),
            torch.cat([zero, ent]).masked_fill(seq_starts, 0.0))
