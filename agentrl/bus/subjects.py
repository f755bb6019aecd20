"""Names of a run's subjects, streams, consumers and buckets (pure; no I/O).

One run is one namespace ``agentrl.<run>``::

    agentrl.<run>.tasks.{resume,eval,new}   stream AGENTRL_<run>_TASKS (work queue)
    agentrl.<run>.traj                      stream AGENTRL_<run>_TRAJ (limits, durable, replayable)
    agentrl.<run>.dlq.<stream>              stream AGENTRL_<run>_DLQ (undecodable / poison messages)
    agentrl.<run>.control.<kind>            stream AGENTRL_<run>_CONTROL (batch_taken, dropped, weights: durable)
    agentrl.<run>.events.<type>             core NATS (metrics, abort broadcasts, logs)
    agentrl.<run>.env.<env name>            core NATS request/reply to env workers (queue group)
    agentrl_<run>                           KV bucket (policy version, controller state, registry)
    agentrl_<run>_weights                   object store (weight snapshots)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

__all__ = ["CONTROL_KINDS", "TASK_PRIORITIES", "ControlKind", "Subjects", "TaskPriority", "validate_run_name"]

TaskPriority = Literal["resume", "eval", "new"]
ControlKind = Literal["batch_taken", "dropped", "weights"]
CONTROL_KINDS: tuple[ControlKind, ...] = ("batch_taken", "dropped", "weights")
TASK_PRIORITIES: tuple[TaskPriority, ...] = ("resume", "eval", "new")  # the order workers poll them in

_RUN_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def validate_run_name(run: str) -> str:
    """Return ``run`` if it can name subjects, streams and buckets; raise ``ValueError`` otherwise."""
    if not _RUN_NAME.match(run):
        raise ValueError(f"run name {run!r}: use 1-64 letters, digits, '_' or '-'")
    return run


@dataclass(frozen=True)
class Subjects:
    """Every name a run uses on the bus."""

    run: str

    def __post_init__(self) -> None:
        validate_run_name(self.run)

    @property
    def prefix(self) -> str:
        return f"agentrl.{self.run}"

    # streams ---------------------------------------------------------
    @property
    def tasks_stream(self) -> str:
        return f"AGENTRL_{self.run}_TASKS"

    @property
    def traj_stream(self) -> str:
        return f"AGENTRL_{self.run}_TRAJ"

    @property
    def dlq_stream(self) -> str:
        return f"AGENTRL_{self.run}_DLQ"

    @property
    def control_stream(self) -> str:
        return f"AGENTRL_{self.run}_CONTROL"

    # subjects --------------------------------------------------------
    def task(self, priority: TaskPriority = "new") -> str:
        if priority not in TASK_PRIORITIES:
            raise ValueError(f"task priority {priority!r}: expected one of {TASK_PRIORITIES}")
        return f"{self.prefix}.tasks.{priority}"

    @property
    def tasks_all(self) -> str:
        return f"{self.prefix}.tasks.>"

    @property
    def traj(self) -> str:
        return f"{self.prefix}.traj"

    def control(self, kind: ControlKind) -> str:
        """Durable control messages the controller's accounting depends on (learner -> controller)."""
        if kind not in CONTROL_KINDS:
            raise ValueError(f"control kind {kind!r}: expected one of {CONTROL_KINDS}")
        return f"{self.prefix}.control.{kind}"

    @property
    def control_all(self) -> str:
        return f"{self.prefix}.control.>"

    def dead_letter_for(self, stream: str) -> str:
        return f"{self.prefix}.dlq.{stream}"

    @property
    def dead_letter(self) -> str:
        return f"{self.prefix}.dlq.>"

    def events(self, type_: str = "*") -> str:
        return f"{self.prefix}.events.{type_}"

    def env(self, name: str) -> str:
        return f"{self.prefix}.env.{name}"

    # buckets ---------------------------------------------------------
    @property
    def kv_bucket(self) -> str:
        return f"agentrl_{self.run}"

    @property
    def weights_bucket(self) -> str:
        return f"agentrl_{self.run}_weights"

    def stream_of(self, subject: str) -> str:
        """The stream that stores ``subject``; ``ValueError`` for a core-NATS subject."""
        if subject.startswith(f"{self.prefix}.tasks."):
            return self.tasks_stream
        if subject == self.traj:
            return self.traj_stream
        if subject.startswith(f"{self.prefix}.dlq."):
            return self.dlq_stream
        if subject.startswith(f"{self.prefix}.control."):
            return self.control_stream
        raise ValueError(f"subject {subject!r} is not stored in a stream of run {self.run!r}")
