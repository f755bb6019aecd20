"""The learner loop with tiny fakes for the bus and a real torch backend on a tiny Qwen2."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import msgspec
import pytest
import torch

from agentrl.config.learner import BatchConfig, LearnerConfig, LossConfig, OptimConfig
from agentrl.config.training import TrainingConfig
from agentrl.errors import VersionConflict
from agentrl.messages import BatchTaken, Event, Message, TasksDropped, Trajectory, WeightUpdate
from tests.fixtures.learner import synth_trajectories
from trainer.backend.torch_backend import build_torch_backend
from trainer.checkpoint import Checkpointer
from trainer.learner import Learner
from trainer.metrics import MetricsSink
from trainer.weights import DiskWeightSink, digest_dir

torch.set_num_threads(1)


class FakeDelivery:
    def __init__(self, traj: Trajectory, on_ack) -> None:
        self.msg = traj
        self.on_ack = on_ack

    async def in_progress(self) -> None:
        pass

    async def ack(self) -> None:
        self.on_ack(self.msg.id)


class FakeSource:
    def __init__(self, deliveries: list[FakeDelivery]) -> None:
        self.queue = list(deliveries)

    async def fetch(self, batch: int = 64, timeout: float = 1.0) -> list[FakeDelivery]:
        out, self.queue = self.queue[:batch], self.queue[batch:]
        if not out:
            await asyncio.sleep(0.01)
        return out


class FakeBus:
    def __init__(self) -> None:
        self.version = 0
        self.events: list[Event] = []
        self.controls: list[tuple[str, Message, str]] = []

    def control(self, kind: str) -> list:
        return [m for k, m, _ in self.controls if k == kind]

    @property
    def updates(self) -> list[WeightUpdate]:
        return self.control("weights")

    @property
    def taken(self) -> list[BatchTaken]:
        return self.control("batch_taken")

    @property
    def dropped(self) -> list[TasksDropped]:
        return self.control("dropped")

    async def get_version(self) -> int:
        return self.version

    async def cas_version(self, expected: int, new: int) -> None:
        if self.version != expected:
            raise VersionConflict(f"{self.version} != {expected}")
        self.version = new

    async def publish_event(self, event: Event) -> None:
        self.events.append(event)

    async def publish_control(self, kind: str, msg: Message, msg_id: str) -> None:
        self.controls.append((kind, msg, msg_id))


TRAINING = TrainingConfig(batch_size=4, group_size=2, max_staleness=3, max_steps=3)


def learner_config(model: Path, **loss: object) -> LearnerConfig:
    return LearnerConfig(
        model=str(model), device="cpu", loss=LossConfig(**loss),  # type: ignore[arg-type]
        optim=OptimConfig(lr=1e-3), batch=BatchConfig(max_tokens_per_micro_batch=40),
    )


def make_learner(cfg: LearnerConfig, tmp: Path, source: FakeSource, bus: FakeBus,
                 training: TrainingConfig = TRAINING) -> tuple[Learner, Checkpointer]:
    ckpt = Checkpointer(tmp / "ckpt")
    learner = Learner(cfg, training, build_torch_backend(cfg), source, bus, DiskWeightSink(tmp / "weights", keep=2),
                      ckpt, MetricsSink(tmp / "metrics.jsonl", bus))
    return learner, ckpt


ONE_STEP = msgspec.structs.replace(TRAINING, max_steps=1)


@pytest.mark.parametrize("checkpoint_every", [1, 2])
async def test_loop_trains_publishes_checkpoints_then_acks(
    tiny_qwen2_dir: Path, tmp_path: Path, checkpoint_every: int
) -> None:
    trajs = synth_trajectories(num_groups=7, group_size=2)
    acked: list[str] = []
    ckpt = Checkpointer(tmp_path / "ckpt")

    def on_ack(tid: str) -> None:  # an ack must come after the checkpoint that records the id
        latest = ckpt.latest()
        assert latest is not None and tid in json.loads((latest / "state.json").read_text())["consumed"]
        acked.append(tid)

    bus = FakeBus()
    cfg = learner_config(tiny_qwen2_dir, kl_coef=0.1, entropy_coef=0.01)
    cfg = msgspec.structs.replace(cfg, checkpoint_every=checkpoint_every)
    learner, ckpt = make_learner(cfg, tmp_path, FakeSource([FakeDelivery(t, on_ack) for t in trajs]), bus)
    saves: list[int] = []
    save = ckpt.save
    ckpt.save = lambda backend, st: (saves.append(st.step), save(backend, st))[1]  # type: ignore[method-assign]
    before = {k: v.clone() for k, v in learner.backend.model.state_dict().items()}  # type: ignore[attr-defined]
    state = await learner.run()

    assert state.step == 3 and state.version == 3 and bus.version == 3
    trained = [tid for rec in state.history for tid in rec.trained]
    assert len(trained) == 12 and len(set(trained)) == 12
    assert sorted(acked) == sorted(trained)
    assert saves == ([1, 2, 3] if checkpoint_every == 1 else [2, 3])  # every k steps, and at the end
    taken = bus.taken
    assert [d.step for d in taken] == [0, 1, 2] and [d.version for d in taken] == [0, 1, 2]
    assert sorted(t for d in taken for t in d.task_ids) == sorted(t.task_id for t in trajs[:12])
    assert [u.version for u in bus.updates] == [1, 2, 3]
    assert [i.rsplit("-", 1)[0] if k == "batch_taken" else i for k, _, i in bus.controls] == \
        ["batch-0", "weights-1", "batch-1", "weights-2", "batch-2", "weights-3"]
    newest = tmp_path / "weights" / "v3"
    assert digest_dir(newest) == (bus.updates[-1].sha256, bus.updates[-1].nbytes)
    assert sorted(p.name for p in (tmp_path / "weights").iterdir()) == ["v2", "v3"]
    after = learner.backend.model.state_dict()  # type: ignore[attr-defined]
    assert any(not torch.equal(before[k], after[k]) for k in before)

    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]
    for key in ("learner/loss/policy", "learner/loss/kl", "learner/policy/clip_frac", "learner/policy/entropy",
                "learner/grad_norm", "learner/reward/mean", "learner/reward/std", "learner/staleness/hist",
                "learner/perf/tokens_per_s", "learner/logprob_diff/mean", "learner/logprob_diff/max"):
        assert key in lines[0], key
    assert lines[0]["learner/staleness/hist"] == {"0": lines[0]["learner/batch/trained_tokens"]}
    assert lines[1]["learner/staleness/hist"] == {"1": lines[1]["learner/batch/trained_tokens"]}
    assert sum(e.type == "metrics" for e in bus.events) == 3

    # A restarted learner resumes the step, version, consumed ids and weights of the checkpoint.
    again, _ = make_learner(cfg, tmp_path, FakeSource([]), bus)
    restored = await again.restore()
    assert (restored.step, restored.version, restored.consumed) == (3, 3, state.consumed)
    for k, v in again.backend.model.state_dict().items():  # type: ignore[attr-defined]
        torch.testing.assert_close(v, after[k], rtol=0, atol=0)


class SlowSink(DiskWeightSink):
    """A disk sink that takes ``delay`` s per version (a large model's write) and records when each publish ran;
    ``fail_at``: that version's publish raises."""

    def __init__(self, root: Path, delay: float, fail_at: int | None = None) -> None:
        super().__init__(root, keep=2)
        self.delay, self.fail_at = delay, fail_at
        self.spans: list[tuple[float, float]] = []

    async def publish(self, version: int, export) -> WeightUpdate:  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        await asyncio.sleep(self.delay)
        if version == self.fail_at:
            raise OSError(f"disk full writing v{version}")
        update = await super().publish(version, export)
        self.spans.append((start, time.perf_counter()))
        return update


def overlapping_learner(tmp: Path, model: Path, bus: FakeBus, sink: SlowSink,
                        trajs: list[Trajectory]) -> tuple[Learner, list[tuple[float, float]]]:
    cfg = msgspec.structs.replace(learner_config(model), overlap_publish=True, checkpoint_every=3)
    source = FakeSource([FakeDelivery(t, lambda _: None) for t in trajs])
    learner = Learner(cfg, TRAINING, build_torch_backend(cfg), source, bus, sink, Checkpointer(tmp / "ckpt"),
                      MetricsSink(tmp / "metrics.jsonl", bus))
    trains: list[tuple[float, float]] = []
    train = learner.train

    def timed_train(batch):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        try:
            return train(batch)
        finally:
            trains.append((start, time.perf_counter()))

    learner.train = timed_train  # type: ignore[method-assign]
    return learner, trains


async def test_overlapped_publish_runs_while_the_next_batch_is_taken_never_while_training(
    tiny_qwen2_dir: Path, tmp_path: Path
) -> None:
    bus, sink = FakeBus(), SlowSink(tmp_path / "weights", delay=0.4)
    learner, trains = overlapping_learner(tmp_path, tiny_qwen2_dir, bus, sink, synth_trajectories(6, 2))
    state = await learner.run()

    assert state.step == 3 and bus.version == 3 and [u.version for u in bus.updates] == [1, 2, 3]
    # the next batch was taken while the previous version was still being written...
    kinds = [i.rsplit("-", 1)[0] if k == "batch_taken" else i for k, _, i in bus.controls]
    assert kinds == ["batch-0", "batch-1", "weights-1", "batch-2", "weights-2", "weights-3"]
    # ...but no step trained while a version was being written (it changes the weights being exported)
    for t0, t1 in trains:
        assert all(t1 <= p0 or p1 <= t0 for p0, p1 in sink.spans), (trains, sink.spans)
    assert digest_dir(tmp_path / "weights" / "v3") == (bus.updates[-1].sha256, bus.updates[-1].nbytes)
    latest = Checkpointer(tmp_path / "ckpt").latest()  # the final checkpoint came after the last publish
    assert latest is not None and json.loads((latest / "state.json").read_text())["version"] == 3
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[1]["learner/time/publish"] > 0.2  # step 2 waited for v1's write: the wait is its publish phase


async def test_an_overlapped_publish_that_fails_stops_the_learner(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    bus, sink = FakeBus(), SlowSink(tmp_path / "weights", delay=0.05, fail_at=2)
    learner, _ = overlapping_learner(tmp_path, tiny_qwen2_dir, bus, sink, synth_trajectories(6, 2))
    with pytest.raises(OSError, match="disk full writing v2"):
        await learner.run()
    assert bus.version == 1 and [u.version for u in bus.updates] == [1]
    assert Checkpointer(tmp_path / "ckpt").latest() is None  # nothing checkpointed past the failed version


async def test_restore_adopts_a_newer_bus_version(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    bus = FakeBus()
    bus.version = 5  # e.g. a crash after the version bump, before the checkpoint
    learner, _ = make_learner(learner_config(tiny_qwen2_dir), tmp_path, FakeSource([]), bus)
    assert (await learner.restore()).version == 5


@pytest.mark.parametrize("fn", ["trainer.losses.sft_loss", "trainer.losses.ppo_loss"])
async def test_loss_is_pluggable_by_dotted_path(tiny_qwen2_dir: Path, tmp_path: Path, fn: str) -> None:
    cfg = learner_config(tiny_qwen2_dir, fn=fn)
    source = FakeSource([FakeDelivery(t, lambda _: None) for t in synth_trajectories(2, 2)])
    learner, _ = make_learner(cfg, tmp_path, source, FakeBus(), ONE_STEP)
    state = await learner.run()
    assert state.step == 1
    key = "learner/loss/sft" if fn.endswith("sft_loss") else "learner/loss/policy"
    assert key in json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])


async def test_filtered_groups_are_announced_as_dropped_and_never_trained(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    trajs = synth_trajectories(num_groups=4, group_size=2, seed=5)
    for i, t in enumerate(trajs):
        t.reward = 1.0 if i < 2 else float(i % 2)  # group 0 has zero variance
    cfg = learner_config(tiny_qwen2_dir)
    training = msgspec.structs.replace(ONE_STEP, group_filter="trainer.batching.drop_zero_variance")
    acked: list[str] = []
    bus = FakeBus()
    learner, _ = make_learner(cfg, tmp_path, FakeSource([FakeDelivery(t, acked.append) for t in trajs]), bus, training)
    state = await learner.run()
    zero = sorted(t.task_id for t in trajs[:2])
    assert [d.task_ids for d in bus.dropped] == [zero]
    assert [d.dropped_task_ids for d in bus.taken] == [zero]
    assert sorted(state.history[0].dropped) == sorted(t.id for t in trajs[:2])
    assert sorted(state.history[0].trained) == sorted(t.id for t in trajs[2:6])
    assert sorted(acked) == sorted(t.id for t in trajs[:6])


@pytest.mark.parametrize("minibatches", [1, 2])
async def test_minibatches_use_proximal_logprobs_from_before_the_first_step(
    tiny_qwen2_dir: Path, tmp_path: Path, minibatches: int
) -> None:
    cfg = msgspec.structs.replace(learner_config(tiny_qwen2_dir), minibatches=minibatches, optim=OptimConfig(lr=5e-2))
    source = FakeSource([FakeDelivery(t, lambda _: None) for t in synth_trajectories(2, 2, seed=7)])
    learner, _ = make_learner(cfg, tmp_path, source, FakeBus(), ONE_STEP)
    await learner.run()
    line = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    if minibatches == 1:
        assert line["learner/policy/approx_kl"] == 0.0  # on-policy: ratio exactly 1
    else:
        assert line["learner/policy/approx_kl"] > 1e-4  # the second step moved away from the proximal policy


def test_activation_checkpointing_gives_the_same_step(tiny_qwen2_dir: Path) -> None:
    from trainer.advantages import grpo
    from trainer.batching import Batch, TrainItem
    from trainer.learner import build_micro_batches
    from trainer.losses import ppo_loss

    trajs = synth_trajectories(2, 2, seed=8)
    batch = Batch(groups=[[TrainItem(t, t.loss_mask.astype("float32")) for t in trajs[:2]],
                          [TrainItem(t, t.loss_mask.astype("float32")) for t in trajs[2:]]])
    results = []
    for ckpt in (False, True):
        cfg = msgspec.structs.replace(learner_config(tiny_qwen2_dir), gradient_checkpointing=ckpt)
        backend = build_torch_backend(cfg)
        results.append(backend.train_step(build_micro_batches(batch, grpo, 40), ppo_loss, cfg.loss))
    plain, checkpointed = results
    assert checkpointed.grad_norm == pytest.approx(plain.grad_norm, rel=1e-5)
    assert checkpointed.metrics["loss/total"] == pytest.approx(plain.metrics["loss/total"], rel=1e-6)


async def test_held_trajectories_are_kept_in_progress(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    """While a group waits for its last member, the learner keeps resetting the bus's ack timer."""
    beats: list[str] = []

    class Beating(FakeDelivery):
        async def in_progress(self) -> None:
            beats.append(self.msg.id)

    first, second = synth_trajectories(1, 2, seed=9)

    class Trickle(FakeSource):
        calls = 0

        async def fetch(self, batch: int = 64, timeout: float = 1.0) -> list[FakeDelivery]:
            self.calls += 1
            await asyncio.sleep(0.01)
            if self.calls == 1:
                return [Beating(first, lambda _: None)]
            return [Beating(second, lambda _: None)] if self.calls == 20 else []

    cfg = learner_config(tiny_qwen2_dir)
    cfg = msgspec.structs.replace(cfg, batch=msgspec.structs.replace(cfg.batch, ack_wait_s=0.03))
    training = msgspec.structs.replace(ONE_STEP, batch_size=2)
    learner, _ = make_learner(cfg, tmp_path, Trickle([]), FakeBus(), training)
    assert (await learner.run()).step == 1
    assert first.id in beats


async def test_tokens_past_the_bound_are_counted_then_masked_or_dropped(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    """A trajectory with tokens older than eta is counted in the staleness metrics at its true age, then masked
    (mask) or dropped (drop) -- the histogram is not capped at the bound it reports on."""
    for policy in ("mask", "drop"):
        trajs = synth_trajectories(2, 2, seed=11, version=0)
        bus = FakeBus()
        bus.version = 3  # the learner trains at version 3: every token is 3 versions old, past eta = 1
        fresh = synth_trajectories(2, 2, seed=12, version=3)
        training = TrainingConfig(batch_size=4, group_size=2, max_staleness=1, stale_policy=policy, max_steps=1)  # type: ignore[arg-type]
        out = tmp_path / policy
        learner, _ = make_learner(learner_config(tiny_qwen2_dir), out, FakeSource(
            [FakeDelivery(t, lambda _: None) for t in trajs + fresh]), bus, training)
        state = await learner.run()
        line = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        old_tokens = sum(t.num_trained_tokens for t in trajs)
        assert line["learner/staleness/hist"]["3"] == old_tokens and line["learner/staleness/max"] == 3
        assert line["learner/staleness/over_bound_tokens"] == old_tokens
        if policy == "mask":  # trained with those tokens out of the loss
            assert line["learner/staleness/masked_tokens"] == old_tokens
            assert line["learner/batch/trained_tokens"] == 0 and state.history[0].dropped == {}
        else:  # not trained at all, and reported
            assert line["learner/staleness/dropped_trajectories"] == 4
            assert sorted(state.history[0].trained) == sorted(t.id for t in fresh)
            assert sorted(d for m in bus.dropped for d in m.task_ids) == sorted(t.task_id for t in trajs)
