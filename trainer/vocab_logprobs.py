"""Per-token logprobs and entropy from vocabulary-parallel logits, never gathering the full vocabulary.

Each TP rank holds logits for its slice of the (padded) vocabulary, ``[T, V/tp]``. The softmax statistics
are combined with three all-reduces of ``[T]`` vectors (max, then sum of exponentials and the target's
logit and the sum of ``p·x`` together), so no rank sees more than its own slice. Only the model's logits
(in their own dtype) are kept for the backward pass; the float32 softmax is recomputed there, in row
chunks, and never stored. On a GPU the per-chunk math is compiled into fused kernels (``VocabSlice.fused``). Columns past the true vocabulary (TP padding) are excluded.

Token ``t`` is scored by row ``t - 1`` divided by ``temperature[t]``: the distribution it was sampled from.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["VocabSlice", "packed_logprobs", "vocab_parallel_logprobs"]

_CHUNK = 4096  # rows of [tokens, vocab/tp] at a time


class VocabSlice:
    """Which columns of the vocabulary this rank's logits hold, and the group that holds the rest.

    ``fused``: run the per-chunk math through ``torch.compile`` (GPU), which fuses the float32 upcast,
    softmax statistics and gradient into a few kernels that read each logit once, instead of one kernel and
    one float32 ``[rows, vocab]`` temporary per elementwise step.
    """

    def __init__(self, start: int, valid: int, group: Any = None, *, fused: bool = False) -> None:
        self.start = start  # global id of local column 0
        self.valid = valid  # local columns that are real vocabulary (the rest is TP padding)
        self.group = group  # the tensor-parallel process group (None: the whole vocabulary is local)
        self.fused = fused

    def all_reduce(self, t: torch.Tensor, op: Any = None) -> torch.Tensor:
        if self.group is not None and dist.get_world_size(self.group) > 1:
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM, group=self.group)
        return t

    def kernels(self) -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:
        """The chunk statistics and chunk gradient functions (compiled when ``fused``)."""
        return _compiled() if self.fused else (_chunk_stats, _chunk_grad)


def _scaled(rows: torch.Tensor, temp: torch.Tensor | None) -> torch.Tensor:
    x = rows.float()
    return x / temp[:, None] if temp is not None else x


def _chunk_stats(rows: torch.Tensor, m: torch.Tensor, temp: torch.Tensor | None, idx: torch.Tensor,
                 inside: torch.Tensor) -> torch.Tensor:
    """``[3, n]``: sum of e^z, z of the target (0 when another rank holds it), sum of e^z·z; z = x/t - max."""
    z = _scaled(rows, temp) - m[:, None]
    e = z.exp()
    return torch.stack([e.sum(-1), z.gather(-1, idx).squeeze(-1) * inside, (e * z).sum(-1)])


def _chunk_grad(rows: torch.Tensor, m: torch.Tensor, log_s: torch.Tensor, entropy: torch.Tensor,
                temp: torch.Tensor | None, g_logp: torch.Tensor, g_ent: torch.Tensor | None, idx: torch.Tensor,
                inside: torch.Tensor) -> torch.Tensor:
    """d(loss)/d(rows) in ``rows``' dtype: d logp_target/dx = onehot - p, d H/dx = -p (log p + H), over t."""
    logq = _scaled(rows, temp) - (m + log_s)[:, None]  # log p
    p = logq.exp()
    coef = g_logp[:, None] if g_ent is None else g_logp[:, None] + g_ent[:, None] * (logq + entropy[:, None])
    g = (-p * coef).scatter_add(1, idx, (g_logp * inside)[:, None])
    if temp is not None:
        g = g / temp[:, None]
    return g.to(rows.dtype)


@functools.cache
def _compiled() -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:
    return (torch.compile(_chunk_stats, dynamic=True, fullgraph=True),
            torch.compile(_chunk_grad, dynamic=True, fullgraph=True))


def _chunks(n: int) -> list[slice]:
    return [slice(i, min(i + _CHUNK, n)) for i in range(0, n, _CHUNK)]


def _target_columns(targets: torch.Tensor, vs: VocabSlice) -> tuple[torch.Tensor, torch.Tensor]:
    """Each target's local column ``[n, 1]`` (clamped) and whether this rank holds it (float ``[n]``)."""
    local = targets - vs.start
    inside = (local >= 0) & (local < vs.valid)
    return local.clamp(0, max(vs.valid - 1, 0))[:, None], inside.float()


def _forward_stats(logits: torch.Tensor, targets: torch.Tensor, temp: torch.Tensor | None,
                   vs: VocabSlice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n, logits = logits.shape[0], logits.detach()  # (compiled functions get plain tensors)
    idx, inside = _target_columns(targets, vs)
    m = logits[:, : vs.valid].max(-1).values.float()  # in the logits' own dtype: no float32 copy
    if temp is not None:
        m = m / temp  # temperatures are positive: max(x / t) = max(x) / t
    m = vs.all_reduce(m, dist.ReduceOp.MAX)
    stats_fn, _ = vs.kernels()
    stats = torch.empty(3, n, dtype=torch.float32, device=logits.device)
    for c in _chunks(n):
        stats[:, c] = stats_fn(logits[c, : vs.valid], m[c], None if temp is None else temp[c], idx[c], inside[c])
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
        ctx.set_materialize_grads(False)  # an entropy used only as a metric gets no gradient pass
        return logp, entropy

    @staticmethod
    def backward(ctx: Any, g_logp: torch.Tensor | None,
                 g_ent: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        # detached: the compiled functions must not see the saved outputs' autograd history
        saved = ctx.saved_tensors
        logits, targets, m, log_s, entropy = (saved[i].detach() for i in (0, 1, 3, 4, 5))
        temp = None if saved[2] is None else saved[2].detach()
        vs: VocabSlice = ctx.vs
        if g_logp is None and g_ent is None:
            return None, None, None, None
        if g_logp is None:
            g_logp = torch.zeros_like(m)
        grad = torch.empty_like(logits)
        grad[:, vs.valid:] = 0  # TP padding columns
        idx, inside = _target_columns(targets, vs)
        _, grad_fn = vs.kernels()
        for c in _chunks(logits.shape[0]):
            grad[c, : vs.valid] = grad_fn(logits[c, : vs.valid], m[c], log_s[c], entropy[c],
                                          None if temp is None else temp[c], g_logp[c],
                                          None if g_ent is None else g_ent[c], idx[c], inside[c])
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
