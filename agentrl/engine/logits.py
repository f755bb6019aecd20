"""Per-request changes to the next-token logits, applied before sampling and before logprobs are taken.

In SGLang's order: ``logit_bias`` (added), penalties on the tokens generated so far (``repetition_penalty``
scales, ``frequency_penalty`` / ``presence_penalty`` subtract), a custom logit processor, the grammar's
allowed-token mask (constrained decoding) and the ``min_new_tokens`` ban on end tokens. These define the
distribution the request samples from, so the logprobs the engine reports are taken after them (as SGLang
does); requests that use none of them cost nothing here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

__all__ = ["CustomCall", "Grammar", "RowLogits", "apply_logits", "needs_processing"]


class Grammar(Protocol):
    """The part of a grammar matcher the logits step needs (see :mod:`agentrl.engine.grammar`)."""

    def allowed_mask(self, vocab_size: int) -> torch.Tensor: ...


@dataclass
class CustomCall:
    """A custom logit processor and its per-request parameters (``custom_params`` plus ``__req__``)."""

    key: str  # the serialized processor: rows with equal keys are processed in one call, as SGLang does
    processor: Any
    params: dict[str, Any]


@dataclass
class RowLogits:
    """What to do to one row's logits; the defaults do nothing."""

    bias: dict[int, float] | None = None
    output_ids: Sequence[int] = ()
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    custom: CustomCall | None = None
    grammar: Grammar | None = None
    ban: list[int] = field(default_factory=list)

    @property
    def active(self) -> bool:
        penalties = self.repetition_penalty != 1.0 or self.frequency_penalty or self.presence_penalty
        return bool(self.bias or penalties or self.custom or self.grammar or self.ban)


def needs_processing(rows: Sequence[RowLogits]) -> bool:
    return any(r.active for r in rows)


def apply_logits(logits: torch.Tensor, rows: Sequence[RowLogits]) -> torch.Tensor:
    """The processed ``[B, V]`` logits (a new tensor when anything applies; the input is never written)."""
    if not needs_processing(rows):
        return logits
    out = logits.clone()  # the model's output may be an inference tensor
    for b, row in enumerate(rows):
        if row.bias:
            ids = torch.tensor(list(row.bias), device=out.device)
            out[b, ids] += torch.tensor(list(row.bias.values()), dtype=out.dtype, device=out.device)
        if row.output_ids and (row.repetition_penalty != 1.0 or row.frequency_penalty or row.presence_penalty):
            _penalize(out[b], row)
    _custom(out, rows)
    for b, row in enumerate(rows):
        if row.grammar is None:
            if row.ban:
                out[b, row.ban] = float("-inf")
            continue
        allowed = row.grammar.allowed_mask(out.shape[-1]).to(out.device)
        if row.ban:  # min_new_tokens yields to a grammar that only allows an end token now
            banned = allowed.clone()
            banned[row.ban] = False
            allowed = banned if bool(banned.any()) else allowed
        out[b] = out[b].masked_fill(~allowed, float("-inf"))
    return out


def _penalize(logits: torch.Tensor, row: RowLogits) -> None:
    ids = torch.tensor(list(row.output_ids), dtype=torch.long, device=logits.device)
    counts = torch.bincount(ids, minlength=logits.shape[-1])[: logits.shape[-1]].to(logits.dtype)
    seen = counts > 0
    if row.repetition_penalty != 1.0:
        scaled = torch.where(logits < 0, logits * row.repetition_penalty, logits / row.repetition_penalty)
        logits.copy_(torch.where(seen, scaled, logits))
    logits -= row.frequency_penalty * counts + row.presence_penalty * seen.to(logits.dtype)


def _custom(logits: torch.Tensor, rows: Sequence[RowLogits]) -> None:
    groups: dict[str, list[int]] = {}
    for b, row in enumerate(rows):
        if row.custom is not None:
            groups.setdefault(row.custom.key, []).append(b)
    for members in groups.values():
        call = rows[members[0]].custom
        assert call is not None
        index = torch.tensor(members, device=logits.device)
        result = call.processor(logits[index], [rows[b].custom.params for b in members])  # type: ignore[union-attr]
        logits[index] = result.to(logits.dtype)
