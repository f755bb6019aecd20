"""From delivered trajectories to training batches: groups, staleness, filters, dedupe.

:class:`GroupBuffer` collects deliveries by ``group_id`` until a group has ``group_size`` members, then
:meth:`GroupBuffer.take` forms a :class:`Batch` of whole groups holding at least B trajectories:

- **staleness** (η = ``max_staleness``): a trained token sampled by policy version ``u`` while the learner is
  at version ``v`` is ``v - u`` versions stale; ``stale_policy="drop"`` drops a trajectory with any token
  staler than η, ``"mask"`` removes only those tokens from its loss mask;
- **incomplete groups** older than ``group_timeout_s``: ``"wait"`` keeps waiting, ``"drop"`` discards them,
  ``"partial"`` trains on the members that came;
- **dynamic sampling**: a :data:`GroupFilter` (dotted path in config) returns False to discard a group,
  e.g. :func:`drop_zero_variance`.

Every delivery taken out of the buffer (trained or discarded, and redeliveries of the same id) is in the
batch's ``consumed`` list, to be acknowledged only after the step that took it is committed.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from agentrl.config.learner import BatchConfig
from agentrl.messages import Trajectory

__all__ = [
    "Batch", "GroupBuffer", "GroupFilter", "Received", "TrainItem", "drop_zero_variance", "keep_all",
    "staleness_histogram",
]


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
    """A trajectory to train on with its effective loss mask (after staleness masking)."""

    traj: Trajectory
    mask: np.ndarray  # float32, aligned with traj.tokens


@dataclass
class Batch:
    """Whole groups to train on plus every delivery to ack once the step is committed."""

    groups: list[list[TrainItem]]
    consumed: list[Received] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)  # trajectory id -> reason

    @property
    def items(self) -> list[TrainItem]:
        return [item for g in self.groups for item in g]

    @property
    def trained_ids(self) -> list[str]:
        return [item.traj.id for item in self.items]

    @property
    def consumed_ids(self) -> list[str]:
        return sorted({*self.trained_ids, *self.dropped})


@dataclass
class _Group:
    first_seen: float
    size: int
    members: dict[str, list[Received]] = field(default_factory=dict)  # id -> every delivery of that id

    def trajectories(self) -> list[Trajectory]:
        return [deliveries[0].msg for deliveries in self.members.values()]


class GroupBuffer:
    """Buffers deliveries into groups; ``committed`` is the set of ids already consumed by committed steps."""

    def __init__(
        self,
        cfg: BatchConfig,
        committed: set[str],
        group_filter: GroupFilter = keep_all,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.committed = committed
        self.group_filter = group_filter
        self.clock = clock
        self._groups: dict[str, _Group] = {}
        self._discarded: list[tuple[Received, str]] = []  # waiting for the next commit to be acked
        self._late: list[Received] = []  # redeliveries of ids taken by the step in flight
        self._pending: set[str] = set()  # ids of batches taken but not yet checkpointed
        self._unreported: list[str] = []  # task ids of discarded trajectories not yet announced

    def add(self, delivery: Received) -> bool:
        """Buffer a delivery. Returns False when it must simply be acked now (already committed, or eval).

        A redelivery of a trajectory taken by a step not yet checkpointed is held and acked after the checkpoint.
        """
        traj = delivery.msg
        if traj.id in self.committed or traj.is_eval:
            return False
        if traj.id in self._pending:
            self._late.append(delivery)
            return True
        group = self._groups.get(traj.group_id)
        if group is None:
            group = self._groups[traj.group_id] = _Group(first_seen=self.clock(), size=traj.group_size)
        group.members.setdefault(traj.id, []).append(delivery)
        return True

    def held(self) -> list[Received]:
        """Every delivery the buffer holds unacked (to keep alive with ``in_progress``)."""
        out = [d for g in self._groups.values() for ds in g.members.values() for d in ds]
        return out + [d for d, _ in self._discarded] + self._late

    @property
    def num_buffered(self) -> int:
        return sum(len(g.members) for g in self._groups.values())

    def take(self, version: int) -> Batch | None:
        """A batch of whole groups with at least B trainable trajectories, or None if not enough are ready.

        Groups that are wholly discarded leave the buffer either way; their deliveries ride with the next batch.
        """
        decisions: list[tuple[str, list[TrainItem], dict[str, str]]] = []
        count = 0
        for gid, group in sorted(self._groups.items(), key=lambda kv: kv[1].first_seen):
            if count >= self.cfg.trajectories_per_step:
                break
            ready = self._readiness(group)
            if ready == "drop":
                decisions.append((gid, [], dict.fromkeys(group.members, "incomplete group timed out")))
            elif ready == "train":
                items, dropped = self._admit(group, version)
                decisions.append((gid, items, dropped))
                count += len(items)
        for gid, items, dropped in decisions:
            if not items:
                members = self._groups.pop(gid).members
                self._discarded.extend((d, dropped[tid]) for tid, ds in members.items() for d in ds)
                self._unreported.extend(ds[0].msg.task_id for ds in members.values())
        if count < self.cfg.trajectories_per_step:
            return None
        batch = Batch(groups=[items for _, items, _ in decisions if items])
        for gid, items, dropped in decisions:
            if items:
                members = self._groups.pop(gid).members
                batch.consumed.extend(d for ds in members.values() for d in ds)
                batch.dropped.update(dropped)
                self._unreported.extend(members[tid][0].msg.task_id for tid in dropped)
        batch.consumed.extend(d for d, _ in self._discarded)
        batch.dropped.update({d.msg.id: reason for d, reason in self._discarded})
        batch.consumed.extend(self._late)
        self._discarded, self._late = [], []
        self._pending |= set(batch.consumed_ids)
        return batch

    def pop_dropped_task_ids(self) -> list[str]:
        """Task ids of trajectories discarded since the last call (the controller admits replacements)."""
        out, self._unreported = self._unreported, []
        return out

    def commit(self) -> list[Received]:
        """Every batch taken so far is checkpointed: its ids are consumed for good.

        Returns the redeliveries of those ids that arrived meanwhile and were not yet handed out with a batch,
        to be acked now.
        """
        self.committed.update(self._pending)
        self._pending = set()
        late, self._late = self._late, []
        return late

    def _readiness(self, group: _Group) -> str:
        if len(group.members) >= group.size:
            return "train"
        if self.cfg.incomplete_group == "wait" or self.clock() - group.first_seen < self.cfg.group_timeout_s:
            return "wait"
        return "train" if self.cfg.incomplete_group == "partial" else "drop"

    def _admit(self, group: _Group, version: int) -> tuple[list[TrainItem], dict[str, str]]:
        """Apply the staleness policy then the group filter: (items to train, dropped id -> reason)."""
        items: list[TrainItem] = []
        dropped: dict[str, str] = {}
        for tid, deliveries in group.members.items():
            item = self._stale_filter(deliveries[0].msg, version)
            if item is None:
                dropped[tid] = f"staler than max_staleness={self.cfg.max_staleness}"
            else:
                items.append(item)
        if items and not self.group_filter([i.traj for i in items]):
            dropped.update({i.traj.id: "rejected by group filter" for i in items})
            return [], dropped
        return items, dropped

    def _stale_filter(self, traj: Trajectory, version: int) -> TrainItem | None:
        mask = traj.loss_mask.astype(np.float32)
        if self.cfg.max_staleness is None:
            return TrainItem(traj, mask)
        stale = (mask > 0) & (version - traj.versions.astype(np.int64) > self.cfg.max_staleness)
        if not stale.any():
            return TrainItem(traj, mask)
        if self.cfg.stale_policy == "drop":
            return None
        mask[stale] = 0.0
        return TrainItem(traj, mask)


def staleness_histogram(items: Sequence[TrainItem], version: int) -> dict[str, int]:
    """Per trained token (after masking): how many versions stale it is -> token count."""
    counts: Counter[int] = Counter()
    for item in items:
        trained = item.mask > 0
        counts.update((version - item.traj.versions[trained].astype(np.int64)).tolist())
    return {str(k): int(v) for k, v in sorted(counts.items())}
