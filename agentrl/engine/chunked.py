"""Chunked prefill: a prompt longer than the prefill token budget is fed in pieces of at most that many tokens.

The scheduler admits at least one request per step even when its new tokens exceed ``max_prefill_tokens`` (a
32k-token agent transcript must still run). Feeding it in one forward pass would size the activations, the
attention workspace and the prompt-scoring logits by the whole prompt; pieces bound them by the budget. Each
piece continues the same row from the keys/values the pieces before it wrote (as a prefix-cache hit does), so
the logits after the last piece are those of one pass. Where prompt logprobs are asked for, consecutive pieces
overlap by one token: piece ``i + 1`` starts with piece ``i``'s last token (its keys/values are rewritten with
the same values), so every target token is scored exactly once from the logits before it.

Here the pieces run back to back within one scheduler step: this bounds memory, not the other requests' latency.
The scheduler uses it where prompt scoring starts early in a long prompt; otherwise it feeds a long prompt one
piece per iteration, the running requests decoding in between (``Scheduler._prefill_piece``), and calls this
only for the last piece.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from agentrl.engine.runner import Prefill, PromptScores, ScoreSpec

__all__ = ["PrefillFn", "piece_bounds", "prefill_in_pieces"]


class PrefillFn(Protocol):
    def __call__(self, rows: Sequence[int], chunks: Sequence[Sequence[int]], starts: Sequence[int], *,
                 score: dict[int, ScoreSpec] | None = None) -> Prefill: ...


def piece_bounds(length: int, limit: int, *, overlap: bool) -> list[tuple[int, int]]:
    """``[begin, end)`` slices of a ``length``-token chunk, each at most ``limit`` tokens (at least 2 when
    ``overlap``, so that pieces advance), consecutive ones sharing one token when ``overlap``."""
    limit = max(limit, 2 if overlap else 1)
    step = limit - 1 if overlap else limit
    bounds, begin = [], 0
    while True:
        end = min(begin + limit, length)
        bounds.append((begin, end))
        if end == length:
            return bounds
        begin += step


def prefill_in_pieces(prefill: PrefillFn, rows: Sequence[int], chunks: Sequence[Sequence[int]],
                      starts: Sequence[int], score: dict[int, ScoreSpec], limit: int) -> Prefill:
    """``prefill(rows, chunks, starts, score=score)`` with no forward pass over more than ``limit`` new tokens
    (one pass when the batch fits, else each request on its own, in pieces)."""
    if sum(len(c) for c in chunks) <= limit:
        return prefill(rows, chunks, starts, score=score)
    logits, scores = [], {}
    for b, (row, chunk, start) in enumerate(zip(rows, chunks, starts, strict=True)):
        spec = score.get(b)
        parts: list[PromptScores] = []
        for begin, end in piece_bounds(len(chunk), limit, overlap=spec is not None):
            out = prefill([row], [chunk[begin:end]], [start + begin], score={0: spec} if spec else None)
            parts.extend(out.prompt_logprobs.values())
        logits.append(out.logits)
        if spec:
            scores[b] = _concat(parts)
    return Prefill(torch.cat(logits), scores)


def _concat(parts: Sequence[PromptScores]) -> PromptScores:
    def cat(field: int) -> torch.Tensor | None:
        tensors = [t for p in parts if (t := p[field]) is not None]
        return torch.cat(tensors) if tensors else None

    logprobs = cat(0)
    assert logprobs is not None
    return PromptScores(logprobs, cat(1), cat(2), cat(3))
