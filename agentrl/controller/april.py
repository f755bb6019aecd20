"""APRIL (active partial rollouts): over-provision generation, abort the surplus once a batch is
taken, resume the aborted episodes first.

* **Over-provisioning**: up to ``ceil(B * (1 + alpha))`` training tasks are in flight, so a step's
  batch is the first ``B`` of ``B * (1 + alpha)`` episodes to finish rather than the slowest of ``B``.
* **Abort surplus** (:func:`choose_surplus`): once the learner has taken its batch, every training
  episode still generating is surplus to that batch. It is aborted so engines reload the new weights
  at a clean boundary and the rest of the episode is sampled by the fresher policy. Its partial
  trajectory (tokens, logprobs, per-token versions, turn state) is re-queued by the worker.
* **Re-queue priority** (:func:`queue_for`): resumed partials first, then eval, then new tasks, so a
  partial rarely waits long enough to leave the staleness bound. Finished surplus is never discarded:
  it is simply in the trajectory stream for the next step.

Unlike slime's fully-async mode, an aborted episode is continued token for token (older tokens keep
their older versions), not restarted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Protocol

from agentrl.bus.subjects import TaskPriority

__all__ = ["InFlight", "choose_surplus", "in_flight_limit", "queue_for"]


class InFlight(Protocol):
    """What APRIL needs to know about one running task."""

    @property
    def task_id(self) -> str: ...
    @property
    def is_eval(self) -> bool: ...
    @property
    def abort_requested(self) -> bool: ...
    @property
    def published(self) -> bool: ...


class _QueuedTask(Protocol):
    @property
    def is_eval(self) -> bool: ...
    @property
    def partial(self) -> object | None: ...


def in_flight_limit(batch_size: int, alpha: float | None) -> int | None:
    """``ceil(B * (1 + alpha))`` training tasks in flight, or ``None`` (no cap) when APRIL is off."""
    if alpha is None:
        return None
    if alpha < 0:
        raise ValueError(f"april alpha must be >= 0, got {alpha}")
    return math.ceil(batch_size * (1 + alpha) - 1e-9)


def choose_surplus(running: Iterable[InFlight], taken: Iterable[str] = ()) -> list[str]:
    """Task ids to abort after a batch was taken: every published training task still running.

    Eval tasks are never aborted (they run at the version they were issued for); tasks the
    learner just took, tasks already asked to abort, and tasks not yet published are skipped.
    """
    taken_ids = set(taken)
    return sorted(
        r.task_id for r in running
        if not r.is_eval and not r.abort_requested and r.published and r.task_id not in taken_ids
    )


def queue_for(task: _QueuedTask) -> TaskPriority:
    """The task queue a task goes to: ``resume`` for partials, then ``eval``, then ``new``."""
    if task.partial is not None:
        return "resume"
    return "eval" if task.is_eval else "new"
