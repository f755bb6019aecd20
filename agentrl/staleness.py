"""The per-token staleness bound, as one pure function used by the learner, the simulator and the benchmarks.

A token sampled by policy version ``u`` and trained at version ``v`` is ``v - u`` versions stale. With bound η:

- a trained token with staleness in ``0..η`` is trained;
- a trained token staler than η is masked out of the loss (``mask``: it stays in the sequence as context) or
  makes its whole trajectory untrainable (``drop``);
- a token from a *future* version (``u > v``) cannot come from this run's learner (nobody but the learner
  publishes weights); its trajectory is never trained, whatever the policy.

:func:`bound_staleness` reports the true staleness of every sampled token (never capped at η), and how many
were over the bound or from the future, so metrics count what happened instead of what the bound allows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = ["StalenessVerdict", "bound_staleness", "staleness_histogram"]

StalePolicy = Literal["mask", "drop"]


@dataclass(frozen=True)
class StalenessVerdict:
    """The bound applied to one trajectory.

    ``mask`` is the effective float32 loss mask, or ``None`` when the trajectory must not be trained
    (``reason`` says why). ``ages`` holds the true staleness of every sampled token (loss mask 1).
    """

    mask: np.ndarray | None
    ages: np.ndarray
    over_bound: int
    from_future: int
    reason: str = ""

    @property
    def masked(self) -> int:
        """Sampled tokens removed from the loss by the bound (0 when dropped: nothing is trained)."""
        return self.over_bound if self.mask is not None else 0


def bound_staleness(
    loss_mask: np.ndarray, versions: np.ndarray, train_version: int, max_staleness: int, policy: StalePolicy
) -> StalenessVerdict:
    """Apply the bound η = ``max_staleness`` to one trajectory trained at ``train_version`` (inputs unmodified)."""
    sampled = np.asarray(loss_mask) > 0
    age_all = train_version - np.asarray(versions, dtype=np.int64)
    ages = age_all[sampled]
    over, future = int((ages > max_staleness).sum()), int((ages < 0).sum())
    if future:
        newest = int(np.asarray(versions)[sampled].max())
        reason = f"tokens from policy version {newest}, newer than the version trained ({train_version})"
        return StalenessVerdict(None, ages, over, future, reason)
    if over and policy == "drop":
        return StalenessVerdict(None, ages, over, future, f"staler than max_staleness={max_staleness}")
    mask = np.asarray(loss_mask, dtype=np.float32).copy()
    if over:
        mask[sampled & (age_all > max_staleness)] = 0.0
    return StalenessVerdict(mask, ages, over, future)


def staleness_histogram(ages: Iterable[np.ndarray]) -> dict[int, int]:
    """``{staleness: tokens}`` over several trajectories' ages (the true values, including those past η)."""
    counts: Counter[int] = Counter()
    for a in ages:
        counts.update(np.asarray(a, dtype=np.int64).tolist())
    return dict(sorted(counts.items()))
