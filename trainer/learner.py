"""The learner's main loop: batch → advantages → pack → train → publish weights → bump version → checkpoint → ack.

The loop depends on narrow Protocols — a :class:`TrajectorySource`, a :class:`LearnerBus` (policy version,
events, weight announcements), a :class:`~trainer.weights.WeightSink` and a
:class:`~trainer.backend.TrainBackend` — so tests drive it with small fakes; :mod:`trainer.bus_adapter`
binds them to the real bus. Each step trains inside a :class:`~trainer.colocate.DeviceTurns` turn: a no-op when the
learner has its device to itself, the engines' release and resume around it with ``learner.colocate``.

Exactly-once training: the ids a step consumed are written into the checkpoint *before* their deliveries
are acked (every ``checkpoint_every`` steps). After a crash, unacked trajectories are redelivered; those
already in the checkpoint are acked and skipped, the rest are trained by the restarted learner.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Coroutine, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from agentrl.bus.subjects import ControlKind
from agentrl.config.learner import LearnerConfig
from agentrl.config.training import TrainingConfig
from agentrl.messages import BatchTaken, Event, Message, TasksDropped, encode
from agentrl.plugins import load_object
from agentrl.staleness import staleness_histogram
from trainer.advantages import AdvantageFn
from trainer.backend.base import StepResult, TrainBackend
from trainer.batching import Batch, GroupBuffer, GroupFilter, Received, TrainItem, keep_all
from trainer.checkpoint import Checkpointer, LearnerState, StepRecord
from trainer.colocate import DedicatedDevice, DeviceTurns
from trainer.losses import LossFn
from trainer.metrics import MetricsSink, Phases, StepCounters
from trainer.packing import MicroBatch, Sample, pack, plan_micro_batches
from trainer.weights import WeightSink

__all__ = ["Learner", "LearnerBus", "TrajectorySource", "build_micro_batches", "to_samples"]

log = logging.getLogger(__name__)


class TrajectorySource(Protocol):
    """Delivers trajectories (``agentrl.bus.Consumer[Trajectory]`` is one); ``[]`` on timeout."""

    async def fetch(self, batch: int = 64, timeout: float = 1.0) -> Sequence[Received]: ...


class LearnerBus(Protocol):
    """Policy version compare-and-set, durable control messages and events."""

    async def get_version(self) -> int: ...

    async def cas_version(self, expected: int, new: int) -> None: ...

    async def publish_control(self, kind: ControlKind, msg: Message, msg_id: str) -> None:
        """Store ``msg`` durably on the run's control stream (deduplicated by ``msg_id``)."""
        ...

    async def publish_event(self, event: Event) -> None: ...


def to_samples(items: Sequence[TrainItem], group_index: Sequence[int], advantage: AdvantageFn) -> list[Sample]:
    """Attach advantages (computed over the groups) to every trajectory; the first token is never trained."""
    rewards = torch.tensor([i.traj.reward for i in items], dtype=torch.float32)
    adv = advantage(rewards, torch.tensor(list(group_index), dtype=torch.long)).tolist()
    samples = []
    for item, a in zip(items, adv, strict=True):
        mask = item.mask.copy()
        mask[:1] = 0.0
        samples.append(Sample(tokens=item.traj.tokens, mask=mask, behaviour_logprobs=item.traj.logprobs,
                              advantage=float(a), versions=item.traj.versions,
                              temperature=item.traj.token_temperatures()))
    return samples


def build_micro_batches(batch: Batch, advantage: AdvantageFn, max_tokens: int) -> list[MicroBatch]:
    """Advantages per group, then padding-free packing under the token budget."""
    return build_minibatches(batch, advantage, max_tokens, 1)[0]


def build_minibatches(batch: Batch, advantage: AdvantageFn, max_tokens: int, parts: int) -> list[list[MicroBatch]]:
    """Advantages over the whole batch, then ``parts`` disjoint mini-batches (sequences dealt round-robin),
    each packed into micro-batches under the token budget."""
    group_index = [g for g, group in enumerate(batch.groups) for _ in group]
    samples = to_samples(batch.items, group_index, advantage)
    out = []
    for k in range(min(parts, len(samples))):
        ids = list(range(k, len(samples), parts))
        plan = plan_micro_batches([len(samples[i]) for i in ids], max_tokens)
        out.append([pack(samples, [ids[j] for j in bin_]) for bin_ in plan])
    return out


def merge_results(results: Sequence[StepResult]) -> StepResult:
    """One report for several optimizer steps: metrics and grad norm averaged, tokens summed; the train-vs-
    rollout logprob gap is the first step's (later steps measure the policy's own movement, not a mismatch)."""
    n = len(results)
    keys = {k for r in results for k in r.metrics}
    return StepResult(
        metrics={k: sum(r.metrics.get(k, 0.0) for r in results) / n for k in keys},
        grad_norm=sum(r.grad_norm for r in results) / n, lr=results[-1].lr, tokens=sum(r.tokens for r in results),
        logprob_diff_mean=results[0].logprob_diff_mean, logprob_diff_max=results[0].logprob_diff_max,
    )


class Learner:
    """Consumes trajectories and trains until ``max_steps`` (0 = until :meth:`stop`)."""

    def __init__(
        self, cfg: LearnerConfig, training: TrainingConfig, backend: TrainBackend, source: TrajectorySource,
        bus: LearnerBus, weights: WeightSink, checkpoints: Checkpointer, metrics: MetricsSink,
        device: DeviceTurns | None = None,
    ) -> None:
        self.cfg, self.training, self.backend, self.source, self.bus = cfg, training, backend, source, bus
        self.weights, self.checkpoints, self.metrics = weights, checkpoints, metrics
        self.device: DeviceTurns = device or DedicatedDevice()  # colocated: the engines lend it for each step
        self.advantage: AdvantageFn = load_object(cfg.advantage, what="learner.advantage")
        self.loss_fn: LossFn = load_object(cfg.loss.fn, what="learner.loss.fn")
        group_filter = training.group_filter
        self.group_filter: GroupFilter = load_object(group_filter, what="training.group_filter") \
            if group_filter else keep_all
        self._stop = asyncio.Event()
        self._unacked: list[Received] = []  # consumed by steps not yet checkpointed
        self.state = LearnerState()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> LearnerState:
        """The loop of docs/architecture.md §7; returns the final state."""
        self.state = state = await self.restore()
        await self.device.start()
        log.info("learner ready at step %d, policy version %d", state.step, state.version)
        buffer = GroupBuffer(self.cfg.batch, self.training, state.consumed, self.group_filter,
                             committed_tasks=state.consumed_tasks, vocab_size=self.backend.vocab_size)
        keepalive = asyncio.create_task(self._keep_alive(buffer))
        try:
            return await self._loop(state, buffer)
        finally:
            keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keepalive

    async def _loop(self, state: LearnerState, buffer: GroupBuffer) -> LearnerState:
        publishing = _Publishing()
        try:
            while not self._done(state):
                phases = Phases()
                with phases("wait"):
                    batch = await self.collect(buffer, state.version)
                if batch is None:
                    break
                self._unacked += batch.consumed
                taken = batch_taken(state, batch)
                await self.bus.publish_control("batch_taken", taken, content_id(f"batch-{taken.step}", taken))
                await publishing.join(phases)  # overlap_publish: the previous version, if still being written
                async with self.device.turn(state.version, phases):
                    with phases("train"):
                        result = await asyncio.to_thread(self.train, batch)
                publishing.start(self.publish(state.version))
                if not self.cfg.overlap_publish:
                    await publishing.join(phases)
                self.state = state = advance(state, batch)
                if state.step % self.cfg.checkpoint_every == 0 or self._done(state):
                    await publishing.join(phases)  # a checkpoint never runs ahead of the bus's version
                    with phases("checkpoint"):
                        await self.commit(state, buffer)
                await self.metrics.record(state.step,
                                          step_metrics(batch, result, state, phases, self.training.max_staleness))
            await publishing.join(Phases())
        finally:
            await publishing.settle()
        if self._unacked:  # stopped between checkpoints: commit what was trained
            await self.commit(state, buffer)
        return state

    async def publish(self, version: int) -> None:
        """Write ``version + 1`` (the weights trained from ``version``), announce it, then bump the bus's version."""
        update = await self.weights.publish(version + 1, self.backend.export_hf)
        await self.bus.publish_control("weights", update, f"weights-{update.version}")
        await self.bus.cas_version(version, version + 1)

    async def commit(self, state: LearnerState, buffer: GroupBuffer) -> None:
        """Checkpoint ``state`` atomically, THEN ack every delivery consumed since the last commit."""
        await asyncio.to_thread(self.checkpoints.save, self.backend, state)
        done, self._unacked = [*self._unacked, *buffer.commit()], []
        await asyncio.gather(*(d.ack() for d in done))

    async def _keep_alive(self, buffer: GroupBuffer) -> None:
        """Mark every held delivery in progress each ack_wait/3 s so the bus does not redeliver it meanwhile."""
        while True:
            await asyncio.sleep(self.cfg.batch.ack_wait_s / 3)
            try:
                for d in [*buffer.held(), *self._unacked]:
                    await d.in_progress()
            except Exception as exc:  # a missed heartbeat only risks a (deduplicated) redelivery
                log.warning("could not mark held trajectories in progress: %r", exc)

    async def restore(self) -> LearnerState:
        """The latest checkpoint (or a fresh state); the policy version is never behind the bus's."""
        state = await asyncio.to_thread(self.checkpoints.load, self.backend) or LearnerState()
        published = await self.bus.get_version()
        if published > state.version:
            # A crash after bumping the version but before the checkpoint: keep versions monotonic.
            log.warning("policy version on the bus is %d, checkpoint has %d: continuing from %d",
                        published, state.version, published)
            state.version = published
        return state

    async def collect(self, buffer: GroupBuffer, version: int) -> Batch | None:
        """Pull deliveries until the buffer yields a batch; None once stopped."""
        while not self._stop.is_set():
            batch = buffer.take(version)
            dropped = buffer.pop_dropped_task_ids()
            if dropped:
                msg = TasksDropped(task_ids=dropped, reason="not trainable (see the learner's batch metrics)")
                await self.bus.publish_control("dropped", msg, content_id(f"dropped-{version}", msg))
            if batch is not None:
                return batch
            for d in await self.source.fetch(self.cfg.batch.fetch_batch, timeout=1.0):
                if not buffer.add(d):
                    await d.ack()  # already consumed by a committed step, or an eval trajectory
        return None

    def train(self, batch: Batch) -> StepResult:
        """Advantages → packed micro-batches → ``minibatches`` optimizer steps (runs in a worker thread)."""
        start, counters = time.perf_counter(), StepCounters.now()
        parts = build_minibatches(batch, self.advantage, self.cfg.batch.max_tokens_per_micro_batch,
                                  self.cfg.minibatches)
        if len(parts) > 1 and self.cfg.loss.proximal:
            for mb in (mb for part in parts for mb in part):
                mb.proximal_logprobs = self.backend.logprobs(mb)  # the pre-update policy, for every step
        result = merge_results([self.backend.train_step(part, self.loss_fn, self.cfg.loss) for part in parts])
        result.metrics["learner/perf/tokens_per_s"] = result.tokens / max(time.perf_counter() - start, 1e-9)
        result.metrics.update(StepCounters.now().since(counters).as_metrics())
        return result

    def _done(self, state: LearnerState) -> bool:
        last = self.training.max_steps
        return self._stop.is_set() or (last is not None and state.step >= last)


class _Publishing:
    """The learner's one publish in flight (``learner.overlap_publish``); time spent waiting for it is the step's
    ``publish`` phase."""

    def __init__(self) -> None:
        self.task: asyncio.Task[None] | None = None

    def start(self, publish: Coroutine[Any, Any, None]) -> None:
        assert self.task is None, "one publish at a time"
        self.task = asyncio.create_task(publish)

    async def join(self, phases: Phases) -> None:
        """Wait for the publish in flight; its error is raised here."""
        task, self.task = self.task, None
        if task is not None:
            with phases("publish"):
                await task

    async def settle(self) -> None:
        """On the way out: let a publish in flight finish (its thread cannot be cancelled); its error is logged,
        as the loop is already failing or returning."""
        task, self.task = self.task, None
        if task is not None:
            await asyncio.wait([task])
            if not task.cancelled() and task.exception() is not None:
                log.error("publishing weights failed: %r", task.exception())


def advance(state: LearnerState, batch: Batch) -> LearnerState:
    """The state after committing ``batch``: one more step, one more version, its ids consumed."""
    record = StepRecord(step=state.step, version=state.version, trained=batch.trained_ids, dropped=batch.dropped)
    return LearnerState(step=state.step + 1, version=state.version + 1,
                        consumed=state.consumed | set(batch.consumed_ids), history=[*state.history, record],
                        consumed_tasks=state.consumed_tasks | set(batch.consumed_task_ids))


def content_id(prefix: str, msg: Message) -> str:
    """A control announcement's dedup id names its content, not just its step: a learner that restarts from
    an earlier checkpoint redoes that step with whatever trajectories arrive first, and the controller must
    hear of those too (only a byte-identical re-announcement is a duplicate)."""
    return f"{prefix}-{hashlib.sha256(encode(msg)).hexdigest()[:16]}"


def batch_taken(state: LearnerState, batch: Batch) -> BatchTaken:
    """What the controller learns of a taken batch: step, version trained from, task ids trained and dropped."""
    dropped = {d.msg.task_id for d in batch.consumed if d.msg.id in batch.dropped}
    return BatchTaken(step=state.step, version=state.version, task_ids=sorted({i.traj.task_id for i in batch.items}),
                      dropped_task_ids=sorted(dropped))


def trained_ages(items: Sequence[TrainItem]) -> list[np.ndarray]:
    """Per item, the staleness of the tokens actually trained (sampled and not masked by the bound)."""
    return [i.ages[i.mask[i.traj.loss_mask > 0] > 0] for i in items]


def step_metrics(batch: Batch, result: StepResult, state: LearnerState, phases: Phases, eta: int) -> dict[str, Any]:
    """The per-step metrics record (keys ``learner/...``)."""
    rewards = np.array([i.traj.reward for i in batch.items], dtype=np.float64)
    out: dict[str, Any] = {f"learner/{k}" if not k.startswith("learner/") else k: v for k, v in result.metrics.items()}
    counts = staleness_histogram([i.ages for i in batch.items] + batch.stale_dropped_ages)
    tokens = max(sum(counts.values()), 1)
    out.update({
        "learner/step": state.step,
        "learner/version": state.version,
        "learner/grad_norm": result.grad_norm,
        "learner/lr": result.lr,
        "learner/reward/mean": float(rewards.mean()),
        "learner/reward/std": float(rewards.std()),
        "learner/batch/trajectories": len(rewards),
        "learner/batch/dropped": len(batch.dropped),
        "learner/batch/tokens": result.tokens,
        "learner/batch/trained_tokens": int(sum(float(i.mask.sum()) for i in batch.items)),
        # the true staleness of every sampled token of the batch (trained, masked or dropped), never capped at η
        "learner/staleness/hist": {str(k): v for k, v in counts.items()},
        "learner/staleness/mean": sum(k * v for k, v in counts.items()) / tokens,
        "learner/staleness/max": max(counts, default=0),
        "learner/staleness/over_bound_tokens": sum(v for k, v in counts.items() if k > eta),
        "learner/staleness/trained_max": max((int(a.max()) for a in trained_ages(batch.items) if a.size), default=0),
        "learner/staleness/masked_tokens": sum(i.masked for i in batch.items),
        "learner/staleness/dropped_trajectories": len(batch.stale_dropped_ages),
        "learner/logprob_diff/mean": result.logprob_diff_mean,
        "learner/logprob_diff/max": result.logprob_diff_max,
        **phases.as_metrics(),
    })
    return out
