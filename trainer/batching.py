"""From delivered trajectories to training batches: groups, staleness, filters, dedupe.

:class:`GroupBuffer` collects deliveries by ``group_id`` until a group has ``group_size`` members (one per
task: members are keyed by task, so two attempts of one task can never fill a group while a real sibling
waits), then :meth:`GroupBuffer.take` forms a :class:`Batch` of whole groups holding at least B trajectories:

- **staleness** (η = ``training.max_staleness``, :func:`agentrl.staleness.bound_staleness`): a trained token
  staler than η is masked out of the loss or drops its trajectory (``training.stale_policy``); tokens from a
  future policy version always drop it;
- **not training data**: eval and aborted trajectories are acked at once; ``failed`` episodes, empty
  trajectories, token ids outside the vocabulary and non-finite logprobs are dropped (reported, never packed)
  while their siblings train;
- **incomplete groups** older than ``group_timeout_s``: ``"wait"`` keeps waiting, ``"drop"`` discards them,
  ``"partial"`` trains on the members that came;
- **dynamic sampling**: the learner alone applies ``training.group_filter`` (False = discard the group),
  e.g. :func:`drop_zero_variance`; the controller admits a replacement for every task reported dropped.

Every delivery taken out of the buffer (trained, discarded, duplicate attempts, redeliveries of the same id) is
in the batch's ``consumed`` list, to be acknowledged only after the step that took it is committed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from agentrl.config.learner import BatchConfig
from agentrl.config.training import TrainingConfig
from agentrl.messages import Trajectory
from agentrl.staleness import bound_staleness

__all__ = ["Batch", "GroupBuffer", "GroupFilter", "Received", "TrainItem", "drop_zero_variance", "keep_all"]


class Received(Protocol):
    """A delivered trajectory that can be acknowledged (``agentrl.bus.Delivery[Trajectory]`` is one)."""

    @property
    def msg(self) -> Trajectory: ...

    async def ack(self) -> None: ...

    async def in_progress(self) -> None: ...


GroupFilter = Callable[[Sequence[Trajectory]], bool]


def keep_all(group: Sequence[Trajectory]) -> bool:
    """The default filter: train on every group."""
    return True


def drop_zero_variance(group: Sequence[Trajectory]) -> bool:
    """DAPO dynamic sampling: keep a group only if its rewards are not all equal (it has a learning signal)."""
    return len({t.reward for t in group}) > 1


@dataclass
class TrainItem:
    """A trajectory to train on with its effective loss mask and the true staleness of its sampled tokens."""

    traj: Trajectory
    mask: np.ndarray  # float32, aligned with traj.tokens (staleness-masked tokens are 0)
    ages: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # per sampled token, uncapped
    masked: int = 0  # sampled tokens the bound removed from the loss


@dataclass
class Batch:
    """Whole groups to train on plus every delivery to ack once the step is committed."""

    groups: list[list[TrainItem]]
    consumed: list[Received] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)  # trajectory id -> reason
    duplicates: list[str] = field(default_factory=list)  # ids of other attempts of tasks trained or dropped here
    stale_dropped_ages: list[np.ndarray] = field(default_factory=list)  # ages of trajectories dropped as stale

    @property
    def items(self) -> list[TrainItem]:
        return [item for g in self.groups for item in g]

    @property
    def trained_ids(self) -> list[str]:
        return [item.traj.id for item in self.items]

    @property
    def consumed_ids(self) -> list[str]:
        return sorted({*self.trained_ids, *self.dropped, *self.duplicates})

    @property
    def consumed_task_ids(self) -> list[str]:
        return sorted({d.msg.task_id for d in self.consumed})


@dataclass
class _Group:
    first_seen: float
    size: int
    members: dict[str, list[Received]] = field(default_factory=dict)  # task id -> deliveries of its first attempt
    others: list[Received] = field(default_factory=list)  # deliveries of further attempts of member tasks

    def deliveries(self) -> list[Received]:
        return [d for ds in self.members.values() for d in ds] + self.others


@dataclass
class _Decision:
    gid: str
    items: list[TrainItem]
    dropped: dict[str, str]  # trajectory id -> reason
    stale_ages: list[np.ndarray]


class GroupBuffer:
    """Buffers deliveries into groups.

    ``committed`` / ``committed_tasks`` are the trajectory and task ids already consumed by committed steps
    (they grow as steps commit).
    """

    def __init__(
        self,
        cfg: BatchConfig,
        training: TrainingConfig,
        committed: set[str],
        group_filter: GroupFilter = keep_all,
        clock: Callable[[], float] = time.monotonic,
        committed_tasks: set[str] | None = None,
        vocab_size: int | None = None,
    ) -> None:
        self.vocab_size = vocab_size
        self.cfg = cfg
        self.training = training
        self.committed = committed
        self.committed_tasks = committed_tasks if committed_tasks is not None else set()
        self.group_filter = group_filter
        self.clock = clock
        self._groups: dict[str, _Group] = {}
        self._discarded: list[tuple[Received, str]] = []  # waiting for the next commit to be acked
        self._late: list[Received] = []  # redeliveries / other attempts of what the step in flight consumed
        self._pending: set[str] = set()  # trajectory ids of batches taken but not yet checkpointed
        self._pending_tasks: set[str] = set()
        self._unreported: list[str] = []  # task ids of discarded trajectories not yet announced
        self._discarded_ages: list[np.ndarray] = []  # staleness of discarded stale trajectories (metrics)

    def add(self, delivery: Received) -> bool:
        """Buffer a delivery. Returns False when it must simply be acked now: not training data (eval,
        aborted attempt), or already consumed by a committed step.

        A delivery of a trajectory (or of a task) taken by a step not yet checkpointed is held and acked after
        the checkpoint.
        """
        traj = delivery.msg
        if traj.is_eval or traj.status == "aborted":
            return False
        if traj.id in self.committed or traj.task_id in self.committed_tasks:
            return False
        if traj.id in self._pending or traj.task_id in self._pending_tasks:
            self._late.append(delivery)
            return True
        group = self._groups.get(traj.group_id)
        if group is None:
            group = self._groups[traj.group_id] = _Group(first_seen=self.clock(), size=traj.group_size)
        first = group.members.get(traj.task_id)
        if first is None:
            group.members[traj.task_id] = [delivery]
        elif first[0].msg.id == traj.id:
            first.append(delivery)  # a redelivery of the same trajectory
        else:
            group.others.append(delivery)  # another attempt of a task already here: never a second member
        return True

    def held(self) -> list[Received]:
        """Every delivery the buffer holds unacked (to keep alive with ``in_progress``)."""
        out = [d for g in self._groups.values() for d in g.deliveries()]
        return out + [d for d, _ in self._discarded] + self._late

    @property
    def num_buffered(self) -> int:
        return sum(len(g.members) for g in self._groups.values())

    def take(self, version: int) -> Batch | None:
        """A batch of whole groups with at least B trainable trajectories, or None if not enough are ready.

        Groups that are wholly discarded leave the buffer either way; their deliveries ride with the next batch.
        """
        decisions = self._decide(version)
        for d in decisions:
            if not d.items:
                self._discard(d)
        if sum(len(d.items) for d in decisions) < self.training.batch_size:
            return None
        batch = Batch(groups=[d.items for d in decisions if d.items])
        for d in decisions:
            if d.items:
                self._consume(d, batch)
        batch.consumed.extend(d for d, _ in self._discarded)
        batch.dropped.update({d.msg.id: reason for d, reason in self._discarded})
        batch.consumed.extend(self._late)
        batch.duplicates.extend(d.msg.id for d in self._late)
        batch.stale_dropped_ages.extend(self._discarded_ages)
        self._discarded, self._late, self._discarded_ages = [], [], []
        self._pending |= set(batch.consumed_ids)
        self._pending_tasks |= set(batch.consumed_task_ids)
        return batch

    def _decide(self, version: int) -> list[_Decision]:
        decisions: list[_Decision] = []
        count = 0
        for gid, group in sorted(self._groups.items(), key=lambda kv: kv[1].first_seen):
            if count >= self.training.batch_size:
                break
            ready = self._readiness(group)
            if ready == "drop":
                reasons = {ds[0].msg.id: "incomplete group timed out" for ds in group.members.values()}
                decisions.append(_Decision(gid, [], reasons, []))
            elif ready == "train":
                decision = self._admit(gid, group, version)
                decisions.append(decision)
                count += len(decision.items)
        return decisions

    def _discard(self, d: _Decision) -> None:
        group = self._groups.pop(d.gid)
        for ds in group.members.values():
            self._discarded.extend((x, d.dropped[ds[0].msg.id]) for x in ds)
            self._unreported.append(ds[0].msg.task_id)
        self._late.extend(group.others)
        self._discarded_ages.extend(d.stale_ages)

    def _consume(self, d: _Decision, batch: Batch) -> None:
        group = self._groups.pop(d.gid)
        batch.consumed.extend(group.deliveries())
        batch.duplicates.extend(x.msg.id for x in group.others)
        batch.dropped.update(d.dropped)
        batch.stale_dropped_ages.extend(d.stale_ages)
        self._unreported.extend(ds[0].msg.task_id for ds in group.members.values() if ds[0].msg.id in d.dropped)

    def pop_dropped_task_ids(self) -> list[str]:
        """Task ids of trajectories discarded since the last call (the controller admits replacements)."""
        out, self._unreported = self._unreported, []
        return out

    def commit(self) -> list[Received]:
        """Every batch taken so far is checkpointed: its ids are consumed for good.

        Returns the deliveries of those ids (or tasks) that arrived meanwhile and were not yet handed out with a
        batch, to be acked now.
        """
        self.committed.update(self._pending)
        self.committed_tasks.update(self._pending_tasks)
        self._pending, self._pending_tasks = set(), set()
        late, self._late = self._late, []
        return late

    def _readiness(self, group: _Group) -> str:
        if len(group.members) >= group.size:
            return "train"
        if self.cfg.incomplete_group == "wait" or self.clock() - group.first_seen < self.cfg.group_timeout_s:
            return "wait"
        return "train" if self.cfg.incomplete_group == "partial" else "drop"

    def _admit(self, gid: str, group: _Group, version: int) -> _Decision:
        """Not-training-data checks, the staleness bound, then the group filter."""
        decision = _Decision(gid, [], {}, [])
        for deliveries in group.members.values():
            traj = deliveries[0].msg
            reason = _not_trainable(traj, self.vocab_size)
            if reason:
                decision.dropped[traj.id] = reason
                continue
            t = self.training
            verdict = bound_staleness(traj.loss_mask, traj.versions, version, t.max_staleness, t.stale_policy)
            if verdict.mask is None:
                decision.dropped[traj.id] = verdict.reason
                decision.stale_ages.append(verdict.ages)
            else:
                decision.items.append(TrainItem(traj, verdict.mask, verdict.ages, verdict.masked))
        if decision.items and not self.group_filter([i.traj for i in decision.items]):
            decision.dropped.update({i.traj.id: "rejected by group filter" for i in decision.items})
            decision.items = []
        return decision


def _not_trainable(traj: Trajectory, vocab_size: int | None) -> str:
    """Why a trajectory is not training data at all ('' when it is): a message the learner could not train on
    must be refused here, or it would crash every step it is redelivered to."""
    if traj.status == "failed":
        return "failed episode (not a policy outcome)"
    if traj.num_tokens == 0:
        return "empty trajectory"
    low, high = int(traj.tokens.min()), int(traj.tokens.max())
    if low < 0 or (vocab_size is not None and high >= vocab_size):
        return f"token ids {low}..{high} outside the model's vocabulary of {vocab_size}"
    if not np.isfinite(traj.logprobs[traj.loss_mask > 0]).all():
        return "behaviour logprobs that are not finite"
    return ""
