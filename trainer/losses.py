"""Token-level RL and SFT losses (pluggable by dotted path, e.g. ``trainer.losses.ppo_loss``).

A :data:`LossFn` is ``fn(inputs: LossInputs, cfg: LossConfig) -> LossOutput``. Inputs are flat
per-token tensors of one micro-batch of packed sequences. Because a training step's batch is split into
micro-batches whose gradients are accumulated, every aggregation divides by the *whole step's* token or
sequence count (``LossInputs.total_tokens`` / ``total_seqs``): summing the losses of all micro-batches
gives exactly the loss of the whole batch. Metrics follow the same rule (token means over the step), so
they are summed across micro-batches too.

Conventions: ``mask`` is 1 for tokens the loss trains on and 0 elsewhere; values at masked-out positions
never reach the loss or its gradient (no NaN leaks from arbitrary logprobs there).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from agentrl.config.learner import Aggregation, LossConfig

__all__ = [
    "LossFn",
    "LossInputs",
    "LossOutput",
    "aggregate",
    "behaviour_weight",
    "kl_penalty",
    "policy_ratio",
    "ppo_loss",
    "sft_loss",
]

_MAX_LOG_RATIO = 20.0  # exp(20) ~ 5e8: keeps a wild ratio finite so clipping/masking can act on it


@dataclass
class LossInputs:
    """One micro-batch, flattened over its packed sequences; all tensors are ``[T]``."""

    logprobs: torch.Tensor  # current policy logprob of each token (carries the gradient)
    behaviour_logprobs: torch.Tensor  # logprob under the policy that sampled the token (from the engine)
    advantages: torch.Tensor  # per token (a trajectory's advantage broadcast to its tokens)
    mask: torch.Tensor  # float 1/0: which tokens the loss trains on
    seq_index: torch.Tensor  # long, 0..num_seqs-1: the sequence each token belongs to
    num_seqs: int
    proximal_logprobs: torch.Tensor | None = None  # logprobs under the pre-update weights (decoupled PPO)
    ref_logprobs: torch.Tensor | None = None  # logprobs under the frozen reference (KL term)
    entropy: torch.Tensor | None = None  # policy entropy at each token (entropy bonus)
    total_tokens: float | None = None  # trained tokens in the whole step; default: this micro-batch's
    total_seqs: float | None = None  # sequences with >= 1 trained token in the whole step; default: this one's

    def token_norm(self) -> float:
        return float(self.total_tokens) if self.total_tokens is not None else max(float(self.mask.sum()), 1.0)

    def seq_norm(self) -> float:
        if self.total_seqs is not None:
            return float(self.total_seqs)
        return max(float((per_seq_sum(self.mask, self) > 0).sum()), 1.0)


@dataclass
class LossOutput:
    """The scalar to backpropagate and named metrics (already normalised over the step: sum them)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


LossFn = Callable[[LossInputs, LossConfig], LossOutput]


def per_seq_sum(values: torch.Tensor, inp: LossInputs) -> torch.Tensor:
    """Sum of ``values`` within each sequence: ``[num_seqs]``."""
    out = torch.zeros(inp.num_seqs, dtype=values.dtype, device=values.device)
    return out.index_add(0, inp.seq_index, values)


def aggregate(values: torch.Tensor, inp: LossInputs, mode: Aggregation) -> torch.Tensor:
    """Reduce per-token ``values`` over the trained tokens.

    - ``token-mean``: sum over all trained tokens / trained tokens in the step;
    - ``seq-mean-token-sum``: per-sequence sums, averaged over the step's sequences;
    - ``seq-mean-token-mean``: per-sequence means, averaged over the step's sequences.
    """
    masked = torch.where(inp.mask > 0, values, torch.zeros_like(values)) * inp.mask
    if mode == "token-mean":
        return masked.sum() / inp.token_norm()
    if mode == "seq-mean-token-sum":
        return masked.sum() / inp.seq_norm()
    if mode == "seq-mean-token-mean":
        lengths = per_seq_sum(inp.mask, inp).clamp(min=1)
        return (per_seq_sum(masked, inp) / lengths).sum() / inp.seq_norm()
    raise ValueError(f"aggregation {mode!r}: expected token-mean, seq-mean-token-sum or seq-mean-token-mean")


def token_mean(values: torch.Tensor, inp: LossInputs) -> torch.Tensor:
    """Detached token-mean over the step (for metrics)."""
    return aggregate(values.detach(), inp, "token-mean")


def policy_ratio(inp: LossInputs, cfg: LossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The importance ratio π/π_old per token and the log-ratio it came from.

    π_old is the proximal policy when ``cfg.proximal`` and proximal logprobs are given, else the behaviour
    policy. With ``ratio_level="sequence"`` (GSPO) each token gets its sequence's length-normalised ratio
    ``exp(mean_t log π/π_old)``, whose gradient flows through every token of the sequence.
    """
    old = _old_logprobs(inp, cfg)
    log_ratio = torch.where(inp.mask > 0, inp.logprobs - old, torch.zeros_like(inp.logprobs))
    if cfg.ratio_level == "sequence":
        lengths = per_seq_sum(inp.mask, inp).clamp(min=1)
        seq_log_ratio = per_seq_sum(log_ratio * inp.mask, inp) / lengths
        log_ratio = seq_log_ratio[inp.seq_index]
    return torch.exp(log_ratio.clamp(max=_MAX_LOG_RATIO)), log_ratio


def _old_logprobs(inp: LossInputs, cfg: LossConfig) -> torch.Tensor:
    if cfg.proximal and inp.proximal_logprobs is not None:
        return inp.proximal_logprobs
    return inp.behaviour_logprobs


def behaviour_weight(inp: LossInputs, cfg: LossConfig) -> torch.Tensor:
    """Detached off-policy weight ``exp(proximal - behaviour)`` per token, truncated/masked per config.

    It is 1 everywhere unless decoupled PPO is on (``cfg.proximal`` and proximal logprobs given) and
    ``behaviour_correction != "off"``; ``"truncate"`` is TIS (``min(w, is_cap)``), ``"mask"`` zeroes tokens
    with ``w > is_cap``.
    """
    ones = torch.ones_like(inp.logprobs)
    if not cfg.proximal or inp.proximal_logprobs is None or cfg.behaviour_correction == "off":
        return ones
    diff = torch.where(inp.mask > 0, inp.proximal_logprobs - inp.behaviour_logprobs, torch.zeros_like(ones))
    w = torch.exp(diff.detach().clamp(max=_MAX_LOG_RATIO))
    if cfg.behaviour_correction == "truncate":
        return w.clamp(max=cfg.is_cap)
    if cfg.behaviour_correction == "mask":
        return torch.where(w <= cfg.is_cap, w, torch.zeros_like(w))
    return w


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(π || π_ref) from sampled tokens: k1 = d, k2 = d²/2, k3 = e^-d + d - 1 (d = log π/π_ref)."""
    d = logprobs - ref_logprobs
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return torch.exp((-d).clamp(max=_MAX_LOG_RATIO)) + d - 1.0
    raise ValueError(f"kl_estimator {estimator!r}: expected k1, k2 or k3")


def ppo_loss(inp: LossInputs, cfg: LossConfig) -> LossOutput:
    """PPO clipped surrogate with clip-low/high, dual clip, decoupled/TIS behaviour weight, KL and entropy.

    Per token, with ratio r and advantage A: ``max(-A·r, -A·clip(r, 1-clip_low, 1+clip_high))``; with
    ``dual_clip = c`` and A < 0 that is further capped at ``-A·c``. The term is scaled by the behaviour
    weight, aggregated per ``cfg.aggregation``; ``kl_coef·KL`` is added and ``entropy_coef·H`` subtracted.
    """
    ratio, log_ratio = policy_ratio(inp, cfg)
    adv = inp.advantages
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    pg = torch.maximum(unclipped, clipped)
    dual = torch.zeros_like(pg, dtype=torch.bool)
    if cfg.dual_clip is not None:
        cap = -adv * cfg.dual_clip
        dual = (adv < 0) & (cap < pg)
        pg = torch.where(dual, cap, pg)
    weight = behaviour_weight(inp, cfg)
    policy_term = aggregate(pg * weight, inp, cfg.aggregation)
    total = policy_term
    metrics = {
        "loss/policy": policy_term.detach(),
        "policy/clip_frac": token_mean((clipped > unclipped).to(pg.dtype), inp),
        "policy/dual_clip_frac": token_mean(dual.to(pg.dtype), inp),
        "policy/approx_kl": token_mean(torch.exp(-log_ratio) + log_ratio - 1.0, inp),
        "policy/ratio_mean": token_mean(ratio, inp),
        "policy/behaviour_weight": token_mean(weight, inp),
    }
    if inp.ref_logprobs is not None and cfg.kl_coef > 0:
        kl = aggregate(kl_penalty(inp.logprobs, inp.ref_logprobs, cfg.kl_estimator), inp, cfg.aggregation)
        total = total + cfg.kl_coef * kl
        metrics["loss/kl"] = kl.detach()
    if inp.entropy is not None:
        entropy = aggregate(inp.entropy, inp, cfg.aggregation)
        if cfg.entropy_coef > 0:
            total = total - cfg.entropy_coef * entropy
        metrics["policy/entropy"] = entropy.detach()
    metrics["loss/total"] = total.detach()
    return LossOutput(total, metrics)


def sft_loss(inp: LossInputs, cfg: LossConfig) -> LossOutput:
    """Negative log-likelihood of the trained tokens, aggregated per ``cfg.aggregation`` (warm-up on demonstrations)."""
    nll = aggregate(-inp.logprobs, inp, cfg.aggregation)
    metrics = {"loss/sft": nll.detach(), "loss/total": nll.detach()}
    if inp.entropy is not None:
        metrics["policy/entropy"] = aggregate(inp.entropy, inp, cfg.aggregation).detach()
    return LossOutput(nll, metrics)
