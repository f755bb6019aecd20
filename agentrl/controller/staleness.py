"""The per-token staleness bound at training time, as a pure function.

A trained token's staleness is ``train_version - token_version``. Tokens older than ``eta`` are
either masked out of the loss (``mask``: they stay in the sequence as context) or make the whole
trajectory untrainable (``drop``). Either way the number of affected tokens is returned, so it can
be counted and reported, never silently lost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import msgspec
import numpy as np

from agentrl.messages import Trajectory

__all__ = ["StaleResult", "enforce_staleness", "staleness_histogram"]

StalePolicy = Literal["drop", "mask"]


@dataclass(frozen=True)
class StaleResult:
    """``trajectory`` is ``None`` when dropped; ``stale_tokens`` counts trained tokens past the bound."""

    trajectory: Trajectory | None
    stale_tokens: int


def enforce_staleness(traj: Trajectory, train_version: int, eta: int, policy: StalePolicy) -> StaleResult:
    """Apply the bound to ``traj`` trained at ``train_version``; arrays of the input are not modified."""
    trained = traj.loss_mask.astype(bool)
    stale = trained & (traj.versions < train_version - eta)
    count = int(stale.sum())
    if count == 0:
        return StaleResult(traj, 0)
    if policy == "drop":
        return StaleResult(None, count)
    mask = np.where(stale, 0, traj.loss_mask).astype(np.uint8)
    return StaleResult(msgspec.structs.replace(traj, loss_mask=mask), count)


def staleness_histogram(traj: Trajectory, train_version: int) -> dict[int, int]:
    """``{staleness: number of trained tokens}`` for ``traj`` trained at ``train_version``."""
    values, counts = np.unique(traj.staleness(train_version), return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts, strict=True)}
