"""The training contract: the settings the controller and the learner must share (the ``training:`` section).

Both actors read this one section, so B, the group size, the staleness bound η and the rest cannot disagree
between them by construction when one config drives both. Actors started by hand from different files are
caught at start: the first actor of a run stores the contract in the run's KV bucket and every actor that
joins checks its own against it (:mod:`agentrl.contract`), refusing to start on a mismatch.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from agentrl.config.loader import Section

__all__ = ["StalePolicy", "TrainingConfig"]

StalePolicy = Literal["mask", "drop"]


class TrainingConfig(Section):
    """What one learner step is and how stale its data may be.

    * ``batch_size`` (B): trajectories per learner step, a multiple of ``group_size`` (whole groups are admitted
      and trained, so the learner never waits on a group admission cut in half).
    * ``max_staleness`` (η): generation runs at most η policy versions ahead of training. The controller admits
      a task only while ``accepted + running < (v + η + 1) · B``; the learner enforces the same bound per token
      (a token sampled by version ``u`` and trained at version ``v`` is ``v - u`` stale). 0 = synchronous.
    * ``stale_policy``: a trained token staler than η is masked out of the loss (``mask``: it stays as context)
      or its whole trajectory is not trained (``drop``); either way it is counted and reported.
    * ``max_steps``: learner steps in the run; ``None`` = until the prompts run out or the run is stopped.
    * ``group_filter``: dotted path of a ``(group) -> keep?`` callable applied by the learner only (dynamic
      sampling, e.g. ``trainer.batching.drop_zero_variance``); the controller admits a replacement for every
      group the learner reports dropped.
    """

    batch_size: Annotated[int, msgspec.Meta(ge=1)] = 64
    """B: trajectories per learner step, a multiple of group_size"""
    group_size: Annotated[int, msgspec.Meta(ge=1)] = 8
    """samples per prompt (a GRPO group); whole groups are admitted and trained"""
    max_staleness: Annotated[int, msgspec.Meta(ge=0)] = 1
    """eta: generation runs at most this many policy versions ahead of training; 0 = synchronous"""
    stale_policy: StalePolicy = "mask"
    """a trained token staler than max_staleness is masked out of the loss (mask) or drops its trajectory
    (drop)"""
    max_steps: Annotated[int, msgspec.Meta(ge=1)] | None = None
    """learner steps in the run; None = until the prompts run out or the run is stopped"""
    group_filter: str | None = None
    """dotted path of a (group) -> keep? callable applied by the learner only, e.g.
    trainer.batching.drop_zero_variance"""

    def __post_init__(self) -> None:
        if self.batch_size % self.group_size:
            raise ValueError(
                f"training.batch_size={self.batch_size} must be a multiple of training.group_size="
                f"{self.group_size} (whole groups are admitted and trained)"
            )
