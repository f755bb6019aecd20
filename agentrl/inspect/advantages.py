"""A group's advantages as the learner computes them, for the viewer's sibling panel.

The learner's per-trajectory advantages are not on the bus, so the viewer recomputes them with the
run's own advantage function (``learner.advantage``, loaded by dotted path). When that cannot be
loaded (no config, a module not installed here) it falls back to plain group-normalised rewards,
``(r - mean) / (std + 1e-6)``, and says so.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from agentrl.errors import ConfigError
from agentrl.plugins import load_object

__all__ = ["GroupAdvantages", "load_group_advantages", "normalised_rewards"]

log = logging.getLogger(__name__)


def normalised_rewards(rewards: Sequence[float]) -> list[float]:
    """``(r - mean) / (std + 1e-6)`` with the unbiased std; all zeros for a group of one."""
    if len(rewards) < 2:
        return [0.0] * len(rewards)
    mean, std = statistics.fmean(rewards), statistics.stdev(rewards)
    return [(r - mean) / (std + 1e-6) for r in rewards]


@dataclass(frozen=True)
class GroupAdvantages:
    """Advantages of one group's rewards; ``source`` names the function used (shown in the viewer)."""

    compute: Callable[[Sequence[float]], list[float]]
    source: str


def _torch_advantage(fn: Callable[[Any, Any], Any]) -> Callable[[Sequence[float]], list[float]]:
    def compute(rewards: Sequence[float]) -> list[float]:
        import torch

        r = torch.tensor(list(rewards), dtype=torch.float32)
        return [float(x) for x in fn(r, torch.zeros(len(rewards), dtype=torch.long)).tolist()]

    return compute


def load_group_advantages(path: str | None) -> GroupAdvantages:
    """The run's advantage function at ``path`` (e.g. ``trainer.advantages.grpo``), or the fallback."""
    if path:
        try:
            fn = load_object(path, what="learner.advantage")
            compute = _torch_advantage(fn)
            compute([0.0, 1.0])  # fail here, not on the first page view
            return GroupAdvantages(compute, path)
        except (ConfigError, TypeError, ValueError, RuntimeError) as exc:
            log.warning("advantages: cannot use %s (%s); showing group-normalised rewards", path, exc)
    return GroupAdvantages(normalised_rewards, "group-normalised rewards (the run's advantage function is not loadable here)")
