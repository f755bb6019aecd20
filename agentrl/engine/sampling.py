"""Batched token sampling with per-row parameters, reproducible per request.

Contract:

- the reported logprob of a sampled token is ``log_softmax(logits / T)[token]`` (``T = 1`` for greedy,
  temperature 0), taken *before* top-k / top-p / min-p truncation, on logits already processed by
  :mod:`agentrl.engine.logits` (bias, penalties, grammar) and the ``min_new_tokens`` ban; the top-k
  logprobs and chosen-token logprobs a request asks for come from the same distribution;
- a row samples by inverting the CDF of its (truncated) distribution at one uniform number that is a pure
  hash of ``(seed, step)``: a request with a fixed ``sampling_seed`` draws the same tokens whatever else is
  in the batch, no per-request RNG object has to be stepped, and the whole batch samples in a few
  vectorized passes over the logits (one cumulative sum and one binary search per row).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

__all__ = ["DeviceSampled", "HostCopy", "Sampled", "SamplingBatch", "hash_uniform", "sample", "sample_on_device"]

_MASK53 = (1 << 53) - 1


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_C1, _C2, _C3 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


@dataclass
class SamplingBatch:
    """Per-row sampling parameters as tensors (all length ``B``)."""

    temperature: torch.Tensor  # float32; <= 0 means greedy
    top_p: torch.Tensor  # float32 in (0, 1]
    top_k: torch.Tensor  # int64; <= 0 means no limit
    min_p: torch.Tensor  # float32 in [0, 1)
    seed: torch.Tensor  # int64
    step: torch.Tensor  # int64: index of the token being sampled within its request
    ban: list[list[int]]  # token ids that may not be sampled (min_new_tokens); [] for most rows
    truncate: bool = True  # whether any row uses top-k / top-p / min-p (known on the host: no device sync)
    top_logprobs: list[int] = field(default_factory=list)  # per row: how many top logprobs to return (0: none)
    token_ids: list[list[int] | None] = field(default_factory=list)  # per row: ids whose logprobs to return

    @classmethod
    def build(
        cls,
        temperature: list[float],
        top_p: list[float],
        top_k: list[int],
        min_p: list[float],
        seed: list[int],
        step: list[int],
        ban: list[list[int]],
        top_logprobs: list[int] | None = None,
        token_ids: list[list[int] | None] | None = None,
    ) -> SamplingBatch:
        return cls(
            torch.tensor(temperature, dtype=torch.float32),
            torch.tensor(top_p, dtype=torch.float32),
            torch.tensor(top_k, dtype=torch.long),
            torch.tensor(min_p, dtype=torch.float32),
            torch.tensor(seed, dtype=torch.long),
            torch.tensor(step, dtype=torch.long),
            ban,
            any(k > 0 for k in top_k) or any(p < 1 for p in top_p) or any(m > 0 for m in min_p),
            top_logprobs or [0] * len(temperature),
            token_ids or [None] * len(temperature),
        )


class Sampled(NamedTuple):
    """One sampled token per row with its logprob; top-k and chosen-id logprobs where rows asked (all on CPU)."""

    tokens: torch.Tensor  # int64 [B]
    logprobs: torch.Tensor  # float32 [B]
    top_values: torch.Tensor | None = None  # [B, max k]
    top_ids: torch.Tensor | None = None  # [B, max k]
    ids_logprobs: list[list[float] | None] | None = None


def hash_uniform(seed: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """``[B]`` float64 in (0, 1): a deterministic, well-mixed function of ``(seed[b], step[b])``."""
    x = seed * _C1 + step * _C3
    for mul in (_C2, _C3):
        x = x ^ (x >> 31)
        x = x * mul
        x = x ^ (x >> 29)
    x = (x >> 10) & _MASK53  # bits 10..62: the final xor with an arithmetic shift clears bit 63
    return (x.double() + 0.5) / float(1 << 53)


def _truncate(logp: torch.Tensor, params: SamplingBatch) -> torch.Tensor:
    """Set log-probs outside each row's top-k / top-p / min-p set to -inf (the top token always stays)."""
    vocab = logp.shape[-1]
    sorted_lp, order = logp.sort(dim=-1, descending=True)
    probs = sorted_lp.exp()
    ranks = torch.arange(vocab, device=logp.device).view(1, -1)
    k = torch.where(params.top_k > 0, params.top_k, vocab).view(-1, 1)
    drop = ranks >= k
    drop |= (probs.cumsum(-1) - probs) > params.top_p.view(-1, 1)
    drop |= probs < params.min_p.view(-1, 1) * probs[:, :1]
    drop[:, 0] = False
    return logp.scatter(-1, order, sorted_lp.masked_fill(drop, float("-inf")))


class DeviceSampled(NamedTuple):
    """:class:`Sampled` still on the logits' device (nothing has waited for the device yet)."""

    tokens: torch.Tensor
    logprobs: torch.Tensor
    top_values: torch.Tensor | None
    top_ids: torch.Tensor | None
    ids_logprobs: torch.Tensor | None  # [B, longest token_ids list], rows padded


def sample_on_device(logits: torch.Tensor, params: SamplingBatch, *, fused: bool | None = None) -> DeviceSampled:
    """Sample one token per row of float32 ``logits [B, V]`` without waiting for the device.

    ``fused`` (default: on CUDA) samples rows without truncation in one Triton kernel
    (:mod:`agentrl.engine.sample_kernel`); the same tokens up to float rounding at CDF boundaries.
    """
    device = logits.device
    p = SamplingBatch(
        params.temperature.to(device, non_blocking=True), params.top_p.to(device, non_blocking=True),
        params.top_k.to(device, non_blocking=True), params.min_p.to(device, non_blocking=True),
        params.seed.to(device, non_blocking=True), params.step.to(device, non_blocking=True),
        params.ban, params.truncate,
    )
    if any(p.ban):
        logits = logits.clone()  # the model's output may be an inference tensor: never write into it
        for row, banned in enumerate(p.ban):
            if banned:
                logits[row, banned] = float("-inf")
    if not p.truncate and (logits.is_cuda if fused is None else fused):
        return _sample_fused(logits, p, params)
    greedy = p.temperature <= 0
    temp = torch.where(greedy, torch.ones_like(p.temperature), p.temperature)
    logp = torch.log_softmax(logits / temp.view(-1, 1), dim=-1)
    filtered = _truncate(logp, p) if p.truncate else logp
    cdf = filtered.exp().cumsum(dim=-1)
    target = hash_uniform(p.seed, p.step).to(cdf.dtype) * cdf[:, -1]
    sampled = torch.searchsorted(cdf, target.view(-1, 1)).view(-1).clamp(max=logits.shape[-1] - 1)
    tokens = torch.where(greedy, torch.argmax(logits, dim=-1), sampled)
    chosen = logp.gather(-1, tokens.view(-1, 1)).view(-1)
    k = max(params.top_logprobs, default=0)
    top = logp.topk(k, dim=-1) if k else None
    return DeviceSampled(
        tokens, chosen, top.values if top is not None else None, top.indices if top is not None else None,
        _ids_logprobs(logp, params.token_ids),
    )


def _sample_fused(logits: torch.Tensor, p: SamplingBatch, params: SamplingBatch) -> DeviceSampled:
    from agentrl.engine.sample_kernel import fused_sample

    out = fused_sample(logits.contiguous(), p.temperature, seed=p.seed, step=p.step)  # the uniform in the kernel
    inv_t, logz = out.inv_temperature.view(-1, 1), out.log_normalizer.view(-1, 1)
    k = max(params.top_logprobs, default=0)
    top = logits.topk(k, dim=-1) if k else None  # logits / T and log-softmax rank the tokens alike
    ids = _ids_logprobs(logits, params.token_ids)
    return DeviceSampled(
        out.tokens, out.logprobs, top.values * inv_t - logz if top is not None else None,
        top.indices if top is not None else None, ids * inv_t - logz if ids is not None else None,
    )


def _ids_logprobs(logp: torch.Tensor, token_ids: list[list[int] | None]) -> torch.Tensor | None:
    width = max((len(ids) for ids in token_ids if ids is not None), default=0)
    if not any(ids is not None for ids in token_ids):
        return None
    index = torch.zeros((len(token_ids), max(width, 1)), dtype=torch.long)
    for row, ids in enumerate(token_ids):
        if ids:
            index[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return logp.gather(-1, index.to(logp.device, non_blocking=True))


class HostCopy:
    """A :class:`DeviceSampled` being copied to the host; :meth:`result` waits for it.

    On CUDA the copies go to pinned memory behind the step's kernels and an event marks their end, so the
    thread that launched the step returns at once; elsewhere the values are already there.
    """

    def __init__(self, out: DeviceSampled, token_ids: list[list[int] | None]) -> None:
        self.token_ids = token_ids
        self.event: torch.cuda.Event | None = None
        if out.tokens.is_cuda:
            out = DeviceSampled(
                _to_pinned(out.tokens), _to_pinned(out.logprobs), *(None if t is None else _to_pinned(t) for t in out[2:])
            )
            self.event = torch.cuda.Event()
            self.event.record()
        self.out = out

    def wait(self) -> None:
        """Block until the copies are done (releases the GIL while it waits)."""
        if self.event is not None:
            self.event.synchronize()

    def result(self) -> Sampled:
        self.wait()
        o = self.out
        ids = None
        if o.ids_logprobs is not None:
            rows = o.ids_logprobs.tolist()
            ids = [None if want is None else rows[b][: len(want)] for b, want in enumerate(self.token_ids)]
        return Sampled(o.tokens.cpu(), o.logprobs.cpu(), o.top_values, o.top_ids, ids)


def _to_pinned(t: torch.Tensor) -> torch.Tensor:
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)


def sample(logits: torch.Tensor, params: SamplingBatch, *, fused: bool | None = None) -> Sampled:
    """Sample one token per row of float32 ``logits [B, V]`` (waits for the device; results on the host)."""
    return HostCopy(sample_on_device(logits, params, fused=fused), params.token_ids).result()
