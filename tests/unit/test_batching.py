"""Group assembly, staleness drop/mask, incomplete-group policies, dynamic sampling and dedupe."""

from __future__ import annotations

import numpy as np
import pytest

from agentrl.config.learner import BatchConfig
from agentrl.config.training import TrainingConfig
from agentrl.messages import Trajectory
from agentrl.staleness import staleness_histogram
from trainer.batching import GroupBuffer, drop_zero_variance


class FakeDelivery:
    def __init__(self, traj: Trajectory) -> None:
        self.msg = traj
        self.acked = 0

    async def in_progress(self) -> None:
        pass

    async def ack(self) -> None:
        self.acked += 1


def traj(tid: str, group: str, size: int, reward: float = 0.0, versions: list[int] | None = None,
         task: str | None = None, status: str = "completed") -> Trajectory:
    v = versions if versions is not None else [0, 0, 0]
    n = 2 + len(v)
    return Trajectory(
        id=tid, task_id=task or tid, group_id=group, group_size=size, tokens=np.arange(n), prompt_len=2,
        loss_mask=[0, 0] + [1] * len(v), logprobs=np.zeros(n), versions=[-1, -1, *v], reward=reward,
        status=status,  # type: ignore[arg-type]
    )


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


_TRAINING = ("batch_size", "max_staleness", "stale_policy")


def buffer(**kw: object) -> tuple[GroupBuffer, Clock]:
    clock = Clock()
    training = TrainingConfig(group_size=1, **{k: v for k, v in kw.items() if k in _TRAINING})  # type: ignore[arg-type]
    batch = BatchConfig(**{k: v for k, v in kw.items() if k not in _TRAINING})  # type: ignore[arg-type]
    return GroupBuffer(batch, training, set(), clock=clock), clock


def test_waits_for_complete_groups_and_takes_whole_groups_fifo() -> None:
    buf, _ = buffer(batch_size=3)
    for d in [FakeDelivery(traj("a0", "a", 2)), FakeDelivery(traj("b0", "b", 2)), FakeDelivery(traj("b1", "b", 2))]:
        assert buf.add(d)
    assert buf.take(0) is None  # b complete (2) < 3, a incomplete
    buf.add(FakeDelivery(traj("a1", "a", 2)))
    batch = buf.take(0)
    assert batch is not None
    assert [[i.traj.id for i in g] for g in batch.groups] == [["a0", "a1"], ["b0", "b1"]]
    assert sorted(d.msg.id for d in batch.consumed) == ["a0", "a1", "b0", "b1"]
    assert buf.num_buffered == 0


def test_staleness_drop_and_mask() -> None:
    versions = [3, 5, 5]  # at version 5: staleness 2, 0, 0
    drop, _ = buffer(batch_size=1, max_staleness=1, stale_policy="drop")
    drop.add(FakeDelivery(traj("x", "g", 2, versions=versions)))
    drop.add(FakeDelivery(traj("y", "g", 2, versions=[5, 5, 5])))
    batch = drop.take(5)
    assert batch is not None and batch.trained_ids == ["y"]
    assert batch.dropped == {"x": "staler than max_staleness=1"} and len(batch.consumed) == 2
    assert drop.pop_dropped_task_ids() == ["x"]
    # the dropped trajectory's true staleness is reported, not hidden by the bound
    assert staleness_histogram(batch.stale_dropped_ages) == {0: 2, 2: 1}

    mask, _ = buffer(batch_size=1, max_staleness=1, stale_policy="mask")
    mask.add(FakeDelivery(traj("x", "g", 1, versions=versions)))
    batch = mask.take(5)
    assert batch is not None
    item = batch.items[0]
    assert item.mask.tolist() == [0, 0, 0, 1, 1]
    assert item.masked == 1 and staleness_histogram([item.ages]) == {0: 2, 2: 1}  # true ages, past the bound too


def test_tokens_from_a_future_policy_version_are_never_trained() -> None:
    for policy in ("mask", "drop"):
        buf, _ = buffer(batch_size=1, max_staleness=1, stale_policy=policy)
        buf.add(FakeDelivery(traj("f", "g", 1, versions=[5, 9, 9])))  # learner at 5: v9 cannot exist yet
        buf.add(FakeDelivery(traj("ok", "h", 1, versions=[5, 5, 5])))
        batch = buf.take(5)
        assert batch is not None and batch.trained_ids == ["ok"]
        assert "newer than the version trained" in batch.dropped["f"]


def test_two_attempts_of_one_task_never_fill_a_group() -> None:
    buf, _ = buffer(batch_size=2)
    first, second = traj("a-0", "g", 2, task="a"), traj("a-1", "g", 2, task="a")
    buf.add(FakeDelivery(first))
    buf.add(FakeDelivery(second))  # another attempt of task a (e.g. a retry raced the original)
    assert buf.take(0) is None  # the group still waits for its real sibling b
    buf.add(FakeDelivery(traj("b-0", "g", 2, task="b")))
    batch = buf.take(0)
    assert batch is not None and batch.trained_ids == ["a-0", "b-0"]
    assert "a-1" in batch.consumed_ids and "a-1" not in batch.dropped  # acked with the step, never trained
    buf.commit()
    assert not buf.add(FakeDelivery(traj("a-2", "g", 2, task="a")))  # a later attempt of a trained task: ack now


def test_failed_empty_and_aborted_trajectories_are_not_training_data() -> None:
    buf, _ = buffer(batch_size=1)
    assert not buf.add(FakeDelivery(traj("ab", "x", 1, status="aborted")))  # an aborted attempt: ack at once
    buf.add(FakeDelivery(traj("f", "g", 3, status="failed")))
    empty = Trajectory(id="e", task_id="e", group_id="g", group_size=3, tokens=[], loss_mask=[], logprobs=[],
                       versions=[], prompt_len=0)
    buf.add(FakeDelivery(empty))
    buf.add(FakeDelivery(traj("ok", "g", 3, reward=1.0)))
    batch = buf.take(0)
    assert batch is not None and batch.trained_ids == ["ok"]  # siblings of failed members still train
    assert set(batch.dropped) == {"f", "e"} and sorted(buf.pop_dropped_task_ids()) == ["e", "f"]


def test_incomplete_group_policies() -> None:
    for policy, trained, dropped in (("drop", ["c0"], ["a0"]), ("partial", ["a0"], [])):
        buf, clock = buffer(batch_size=1, incomplete_group=policy, group_timeout_s=10)
        buf.add(FakeDelivery(traj("a0", "a", 3)))
        assert buf.take(0) is None
        clock.t = 11
        buf.add(FakeDelivery(traj("c0", "c", 1)))
        batch = buf.take(0)
        assert batch is not None
        assert batch.trained_ids == trained  # partial: a0 (oldest) alone fills B=1
        assert sorted(batch.dropped) == dropped
        assert sorted(d.msg.id for d in batch.consumed) == sorted({*trained, *dropped})

    wait, clock = buffer(batch_size=1, incomplete_group="wait", group_timeout_s=10)
    wait.add(FakeDelivery(traj("a0", "a", 3)))
    clock.t = 1e9
    assert wait.take(0) is None


def test_dynamic_sampling_filter_discards_zero_variance_groups_and_acks_them_later() -> None:
    buf = GroupBuffer(BatchConfig(), TrainingConfig(batch_size=2, group_size=1), set(), group_filter=drop_zero_variance)
    buf.add(FakeDelivery(traj("z0", "z", 2, reward=1.0)))
    buf.add(FakeDelivery(traj("z1", "z", 2, reward=1.0)))
    assert buf.take(0) is None  # z rejected; nothing to train yet
    assert buf.num_buffered == 0
    assert buf.pop_dropped_task_ids() == ["z0", "z1"]  # announced at once, acked with the next batch
    buf.add(FakeDelivery(traj("k0", "k", 2, reward=0.0)))
    buf.add(FakeDelivery(traj("k1", "k", 2, reward=1.0)))
    batch = buf.take(0)
    assert batch is not None and batch.trained_ids == ["k0", "k1"]
    assert batch.dropped == {"z0": "rejected by group filter", "z1": "rejected by group filter"}
    assert sorted(d.msg.id for d in batch.consumed) == ["k0", "k1", "z0", "z1"]
    assert batch.consumed_ids == ["k0", "k1", "z0", "z1"]
    assert buf.pop_dropped_task_ids() == []


def test_redeliveries_are_deduplicated() -> None:
    buf, _ = buffer(batch_size=2)
    first, again = FakeDelivery(traj("a0", "a", 2)), FakeDelivery(traj("a0", "a", 2))
    buf.add(first)
    buf.add(again)
    buf.add(FakeDelivery(traj("a1", "a", 2)))
    batch = buf.take(0)
    assert batch is not None and batch.trained_ids == ["a0", "a1"]
    assert sum(d is first or d is again for d in batch.consumed) == 2  # both deliveries get acked

    late = FakeDelivery(traj("a1", "a", 2))
    assert buf.add(late)  # step not checkpointed yet: held, acked after the checkpoint, never retrained
    buf.add(FakeDelivery(traj("b0", "b", 1)))
    buf.add(FakeDelivery(traj("b1", "b2", 1)))
    nxt = buf.take(1)
    assert nxt is not None and nxt.trained_ids == ["b0", "b1"] and late in nxt.consumed
    later = FakeDelivery(traj("b0", "b", 1))
    assert buf.add(later)  # b0 taken, not checkpointed
    assert buf.commit() == [later]
    assert not buf.add(FakeDelivery(traj("a0", "a", 2)))  # checkpointed: ack now
    assert not buf.add(FakeDelivery(traj("b1", "b2", 1)))


def test_eval_trajectories_are_never_trained() -> None:
    buf, _ = buffer(batch_size=1)
    t = traj("e", "e", 1)
    t.is_eval = True
    assert not buf.add(FakeDelivery(t))
    assert buf.take(0) is None


@pytest.mark.parametrize("n", [1, 3])
def test_batch_takes_at_least_b(n: int) -> None:
    buf, _ = buffer(batch_size=n)
    for g in range(4):
        for i in range(2):
            buf.add(FakeDelivery(traj(f"{g}-{i}", str(g), 2)))
    batch = buf.take(0)
    assert batch is not None and len(batch.trained_ids) == 2 * ((n + 1) // 2)


@pytest.mark.parametrize("path", ["trainer.batching.keep_all", "trainer.batching.drop_zero_variance"])
def test_group_filter_contract(path: str) -> None:
    """Any GroupFilter named in config takes a group's trajectories and returns a bool."""
    from agentrl.plugins import load_object

    fn = load_object(path, what="learner.batch.group_filter")
    assert isinstance(fn([traj("a", "g", 2, reward=0.0), traj("b", "g", 2, reward=1.0)]), bool)


def test_a_trajectory_the_model_cannot_take_is_dropped_not_trained() -> None:
    buf = GroupBuffer(BatchConfig(), TrainingConfig(batch_size=1, group_size=1), set(), vocab_size=4)
    bad_ids = traj("big", "a", 1)  # tokens 0..4, vocabulary 0..3
    nan = Trajectory(id="nan", task_id="nan", group_id="b", tokens=[0, 1, 2], loss_mask=[0, 1, 1],
                     logprobs=[0, float("nan"), -1], versions=[-1, 0, 0], prompt_len=1)
    ok = Trajectory(id="ok", task_id="ok", group_id="c", tokens=[0, 1, 2], loss_mask=[0, 1, 1],
                    logprobs=[0, -1, -1], versions=[-1, 0, 0], prompt_len=1)
    for t in (bad_ids, nan, ok):
        buf.add(FakeDelivery(t))
    batch = buf.take(0)
    assert batch is not None and batch.trained_ids == ["ok"]
    assert "outside the model's vocabulary of 4" in batch.dropped["big"] and "not finite" in batch.dropped["nan"]
