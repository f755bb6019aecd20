"""Sequence-level advantage estimators (pluggable by dotted path, e.g. ``trainer.advantages.grpo``).

Every estimator is an :data:`AdvantageFn`: ``fn(rewards, group_index) -> advantages`` where

- ``rewards`` is a float tensor ``[N]``, one scalar reward per trajectory;
- ``group_index`` is a long tensor ``[N]`` with values in ``0..G-1`` naming each trajectory's group
  (groups may differ in size, e.g. partial groups);
- the result is a float tensor ``[N]``, broadcast by the learner to every trained token of the trajectory.

A group of one trajectory has no baseline to compare against; all estimators give it advantage 0.
GSPO is not an advantage estimator: it uses GRPO advantages with sequence-level ratios
(``LossConfig.ratio_level = "sequence"``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["EPS", "AdvantageFn", "dr_grpo", "group_stats", "grpo", "reinforce_pp_baseline", "rloo"]

EPS = 1e-6
AdvantageFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def group_stats(rewards: torch.Tensor, group_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per trajectory: its group's size, reward mean and unbiased reward std (0 for groups of one)."""
    num_groups = int(group_index.max().item()) + 1 if group_index.numel() else 0
    r = rewards.to(torch.float64)
    count = torch.zeros(num_groups, dtype=torch.float64, device=r.device).index_add_(0, group_index, torch.ones_like(r))
    total = torch.zeros_like(count).index_add_(0, group_index, r)
    mean = total / count.clamp(min=1)
    sq = torch.zeros_like(count).index_add_(0, group_index, (r - mean[group_index]) ** 2)
    std = torch.where(count > 1, (sq / (count - 1).clamp(min=1)).sqrt(), torch.zeros_like(sq))
    return count[group_index], mean[group_index], std[group_index]


def grpo(rewards: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
    """GRPO: ``(r - group mean) / (group std + EPS)``."""
    n, mean, std = group_stats(rewards, group_index)
    adv = (rewards.to(torch.float64) - mean) / (std + EPS)
    return torch.where(n > 1, adv, torch.zeros_like(adv)).to(rewards.dtype)


def dr_grpo(rewards: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
    """Dr. GRPO: ``r - group mean`` (no std normalisation; pair with a token-sum aggregation for no length bias)."""
    n, mean, _ = group_stats(rewards, group_index)
    adv = rewards.to(torch.float64) - mean
    return torch.where(n > 1, adv, torch.zeros_like(adv)).to(rewards.dtype)


def rloo(rewards: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
    """RLOO: ``r - mean of the other rewards of the group`` (leave-one-out baseline)."""
    n, mean, _ = group_stats(rewards, group_index)
    r = rewards.to(torch.float64)
    others = (mean * n - r) / (n - 1).clamp(min=1)
    return torch.where(n > 1, r - others, torch.zeros_like(r)).to(rewards.dtype)


def reinforce_pp_baseline(rewards: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
    """REINFORCE++ with baseline: ``r - group mean``, then whitened over the whole batch of trajectories.

    Whitening is over sequences (mean 0, unbiased std 1 across the batch); a batch of one trajectory,
    or one where every centred reward is equal, is returned centred only.
    """
    centred = dr_grpo(rewards, group_index).to(torch.float64)
    if centred.numel() < 2:
        return centred.to(rewards.dtype)
    whitened = (centred - centred.mean()) / (centred.std() + EPS)
    return whitened.to(rewards.dtype)
