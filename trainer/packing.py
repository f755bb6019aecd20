"""Pack variable-length sequences into padding-free micro-batches bounded by a token budget.

A :class:`MicroBatch` holds several sequences concatenated into one row (``[1, T]``) with position ids that
restart at 0 for every sequence. Hugging Face models read those position ids to keep attention within each
sequence (a block-diagonal causal mask for sdpa/eager, varlen kernels for flash-attention), so no token
attends across a sequence boundary and no compute is spent on padding.

Per-token arrays follow the trajectory convention: entry ``t`` belongs to token ``t`` (its logprob is the
model's prediction of token ``t`` from the tokens before it); the first token of a sequence has no
prediction and must have mask 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["MicroBatch", "Sample", "pack", "plan_micro_batches", "token_logprobs"]

_ENTROPY_CHUNK = 4096  # rows of [tokens, vocab] processed at once for the entropy metric


@dataclass(frozen=True)
class Sample:
    """One sequence to train on. Arrays are 1-D and aligned with ``tokens``."""

    tokens: np.ndarray  # int token ids
    mask: np.ndarray  # float 1/0: tokens the loss trains on
    behaviour_logprobs: np.ndarray  # float: logprob under the sampling policy (0 where mask is 0)
    advantage: float = 0.0
    versions: np.ndarray | None = None  # int policy version per token (for staleness metrics)
    temperature: np.ndarray | None = None  # float sampling temperature per token (None = 1.0)

    def __post_init__(self) -> None:
        n = len(self.tokens)
        temps = n if self.temperature is None else len(self.temperature)
        if len(self.mask) != n or len(self.behaviour_logprobs) != n or temps != n:
            raise ValueError(
                f"sample arrays misaligned: tokens={n} mask={len(self.mask)} logprobs={len(self.behaviour_logprobs)}"
                f" temperature={temps}"
            )
        if n and self.mask[0] != 0:
            raise ValueError("sample: the first token has no prediction and cannot be trained on (mask[0] must be 0)")

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class MicroBatch:
    """Packed sequences: ``input_ids``/``position_ids`` are ``[1, T]``, the rest ``[T]`` (float32 / long)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    seq_lens: list[int]
    seq_index: torch.Tensor  # which packed sequence each token belongs to, 0..len(seq_lens)-1
    mask: torch.Tensor
    behaviour_logprobs: torch.Tensor
    advantages: torch.Tensor
    sample_ids: list[int]  # index of each packed sequence in the list given to pack()
    proximal_logprobs: torch.Tensor | None = None  # [T], set when the policy takes several steps per batch
    # [T] sampling temperature of each token: its logprob is log_softmax(logits[t-1] / temperature[t]); None = 1
    temperature: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    def to(self, device: torch.device | str) -> MicroBatch:
        """A copy with every tensor on ``device``."""
        return MicroBatch(
            input_ids=self.input_ids.to(device), position_ids=self.position_ids.to(device), seq_lens=self.seq_lens,
            seq_index=self.seq_index.to(device), mask=self.mask.to(device),
            behaviour_logprobs=self.behaviour_logprobs.to(device), advantages=self.advantages.to(device),
            sample_ids=self.sample_ids,
            proximal_logprobs=None if self.proximal_logprobs is None else self.proximal_logprobs.to(device),
            temperature=None if self.temperature is None else self.temperature.to(device),
        )


def plan_micro_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group sequence indices into bins of at most ``max_tokens`` tokens (first-fit decreasing).

    A sequence longer than ``max_tokens`` gets a bin of its own. Within a bin, indices keep ascending order,
    and bins are returned in order of their first index, so the plan is deterministic.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        n = lengths[i]
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(max_tokens - n)
    return sorted((sorted(b) for b in bins), key=lambda b: b[0])


def pack(samples: Sequence[Sample], ids: Sequence[int] | None = None) -> MicroBatch:
    """Concatenate ``samples[i] for i in ids`` (default: all) into one padding-free micro-batch."""
    chosen = list(range(len(samples))) if ids is None else list(ids)
    if not chosen:
        raise ValueError("pack: no sequences given")
    seqs = [samples[i] for i in chosen]
    lens = [len(s) for s in seqs]
    if min(lens) < 1:
        raise ValueError("pack: empty sequence")
    tokens = np.concatenate([np.asarray(s.tokens, dtype=np.int64) for s in seqs])
    positions = np.concatenate([np.arange(n, dtype=np.int64) for n in lens])
    seq_index = np.repeat(np.arange(len(seqs), dtype=np.int64), lens)
    return MicroBatch(
        input_ids=torch.from_numpy(tokens)[None],
        position_ids=torch.from_numpy(positions)[None],
        seq_lens=lens,
        seq_index=torch.from_numpy(seq_index),
        mask=torch.from_numpy(np.concatenate([np.asarray(s.mask, dtype=np.float32) for s in seqs])),
        behaviour_logprobs=torch.from_numpy(
            np.concatenate([np.asarray(s.behaviour_logprobs, dtype=np.float32) for s in seqs])
        ),
        advantages=torch.from_numpy(np.repeat(np.asarray([s.advantage for s in seqs], dtype=np.float32), lens)),
        sample_ids=chosen,
        temperature=_temperatures(seqs),
    )


def _temperatures(seqs: Sequence[Sample]) -> torch.Tensor | None:
    """The packed per-token temperatures, or None when every sequence was sampled at temperature 1."""
    temps = [np.ones(len(s), np.float32) if s.temperature is None else np.asarray(s.temperature, np.float32)
             for s in seqs]
    flat = np.concatenate(temps)
    return None if bool(np.all(flat == 1.0)) else torch.from_numpy(flat)


def token_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, seq_starts: torch.Tensor, *, with_entropy: bool = False,
    entropy_grad: bool = False, temperature: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logprob (and optionally entropy) of every token of a packed row, computed in float32.

    ``logits`` is ``[T, V]``, ``input_ids`` ``[T]``, ``seq_starts`` a bool ``[T]`` marking each sequence's
    first token. Token ``t`` is scored by ``logits[t-1] / temperature[t]`` (the distribution it was sampled
    from; ``temperature`` ``[T]`` or None = 1); first tokens get logprob 0 and entropy 0. The entropy carries
    a gradient only with ``entropy_grad`` (an entropy bonus); else it is a detached metric.
    """
    scores = logits[:-1]
    if temperature is not None:
        scores = scores.float() / temperature[1:, None].to(scores.device)
    logp_all = torch.log_softmax(scores, dim=-1, dtype=torch.float32)  # upcasts without an extra copy
    next_logp = logp_all.gather(-1, input_ids[1:, None]).squeeze(-1)
    zero = next_logp.new_zeros(1)
    logp = torch.cat([zero, next_logp]).masked_fill(seq_starts, 0.0)
    if not with_entropy:
        return logp, None
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        # In row chunks: without a gradient this bounds the [tokens, vocab] temporaries to one chunk.
        ent = torch.cat([-(c.exp() * c).sum(-1) for c in logp_all.split(_ENTROPY_CHUNK)])
    return logp, torch.cat([zero, ent]).masked_fill(seq_starts, 0.0)
