"""APRIL (active partial rollouts), as agentrl does it: over-provision generation, and cut the long tail at
weight updates instead of waiting for it.

* **Over-provisioning** (:func:`in_flight_limit`): up to ``ceil(B * (1 + alpha))`` training tasks are in flight,
  so a step's batch is the first ``B`` of ``B * (1 + alpha)`` episodes to finish rather than the slowest of ``B``.
  Finished surplus is never discarded: it is simply in the trajectory stream for the next step.
* **Abort at weight updates**: an engine that must drain its running requests before it can load new weights
  (real SGLang; the embedded engine with ``engine.weight_update: drain``) would wait for its longest request at
  every update. With APRIL on, the controller asks each engine to abort its in-flight requests when it loads
  new weights (SGLang's ``abort_all_requests``); every aborted episode resumes at once, token for token, on the
  same worker and environment (older tokens keep their older versions). An engine that swaps weights between
  decode steps (the embedded default) needs no abort: nothing is aborted there.
* **Re-queue priority** (:func:`queue_for`): episodes handed to another worker (their worker stopped) resume
  first, then eval, then new tasks.

Unlike slime's fully-async mode, an aborted episode is continued token for token, not restarted.
"""

from __future__ import annotations

import math
from typing import Protocol

from agentrl.bus.subjects import TaskPriority

__all__ = ["in_flight_limit", "queue_for"]


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


def queue_for(task: _QueuedTask) -> TaskPriority:
    """The task queue a task goes to: ``resume`` for partials, then ``eval``, then ``new``."""
    if task.partial is not None:
        return "resume"
    return "eval" if task.is_eval else "new"
