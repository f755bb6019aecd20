"""The controller's durable state, persisted in the run's KV bucket.

A restarted controller loads this and continues: the dataset cursor says which prompts were issued,
``running`` lists every admitted task not yet finished (re-published with the same message id if it
may not have reached the queue — JetStream's duplicate window makes that a no-op when it had), and
the counters carry the admission rule's ``accepted`` across the restart. Nothing is re-issued and
nothing is lost.
"""

from __future__ import annotations

from typing import Protocol

import msgspec

from agentrl.controller.dataset import DatasetCursor

__all__ = ["STATE_KEY", "ControllerState", "Counters", "EvalPass", "GroupRecord", "KVStore", "TaskRecord",
           "load_state", "save_state"]

STATE_KEY = "controller.state"


class TaskRecord(msgspec.Struct, kw_only=True):
    """One admitted task not yet finished; enough to rebuild the exact Task from the dataset."""

    task_id: str
    group_id: str
    row: int
    index_in_group: int
    group_size: int
    admitted_version: int
    is_eval: bool = False
    published: bool = False


class GroupRecord(msgspec.Struct, kw_only=True):
    """A training group's finished members, until the group is complete."""

    size: int
    task_ids: list[str] = []


class EvalPass(msgspec.Struct, kw_only=True):
    """One evaluation pass at one policy version."""

    version: int
    issued: int = 0
    finished: int = 0
    reward_sum: float = 0.0
    judged: int = 0  # episodes that carry the verifier's verdict (Trajectory.correct is not None)
    correct: int = 0


class Counters(msgspec.Struct, kw_only=True):
    admitted: int = 0  # training tasks published (first attempts)
    finished: int = 0  # training trajectories seen on the stream
    accepted: int = 0  # finished, minus learner drops (filters, staleness, failures): the admission rule's `accepted`
    failed: int = 0
    resumed: int = 0  # finished trajectories that had been aborted and resumed (attempt > 0)
    trained: int = 0  # reported taken by the learner (batch_taken)
    dropped: int = 0  # reported dropped by the learner (e.g. past the staleness bound)
    presumed_dropped: int = 0  # never reported, but necessarily dropped (see ControllerCore._presume_dropped)
    duplicates: int = 0  # trajectories for tasks not running (redeliveries, ignored)
    eval_admitted: int = 0
    eval_finished: int = 0
    groups_issued: int = 0
    trained_tokens: int = 0
    off_policy_tokens: int = 0  # trained tokens sampled by an older policy than the one trained
    stale_tokens: int = 0  # sampled tokens past the bound (or from the future) when their trajectory was taken
    stale_violations: int = 0  # ... of which the learner should not have taken (`drop`, or future): stays 0


class ControllerState(msgspec.Struct, kw_only=True):
    cursor: DatasetCursor = msgspec.field(default_factory=DatasetCursor)
    version: int = 0
    exhausted: bool = False
    counters: Counters = msgspec.field(default_factory=Counters)
    running: dict[str, TaskRecord] = {}
    groups: dict[str, GroupRecord] = {}
    # trained-token version histograms of finished, not yet trained tasks: task id -> {version: tokens}
    pending_versions: dict[str, dict[int, int]] = {}
    complete_since: dict[str, int] = {}  # pending task id -> policy version when its group completed
    # learner verdicts that arrived before the trajectory did: task id -> train version, or None = dropped
    early_verdicts: dict[str, int | None] = {}
    staleness_hist: dict[int, int] = {}  # staleness (versions) -> trained tokens
    eval_passes: dict[int, EvalPass] = {}
    eval_done_through: int = -1  # highest version an eval pass was issued for
    # with max_steps: the policy version the learner's last step publishes (set by that step's batch_taken)
    final_version: int | None = None


class KVStore(Protocol):
    """The two KV calls state persistence needs (the Bus satisfies it)."""

    async def kv_get(self, key: str) -> bytes | None: ...
    async def kv_put(self, key: str, value: bytes, *, expected_revision: int | None = None) -> int: ...


_ENC = msgspec.msgpack.Encoder()
_DEC = msgspec.msgpack.Decoder(ControllerState)


async def load_state(kv: KVStore, key: str = STATE_KEY) -> ControllerState | None:
    """The saved state, or ``None`` for a fresh run."""
    raw = await kv.kv_get(key)
    return None if raw is None else _DEC.decode(raw)


async def save_state(kv: KVStore, state: ControllerState, key: str = STATE_KEY) -> int:
    """Write the whole state (one KV value); returns the KV revision."""
    return await kv.kv_put(key, _ENC.encode(state))
