"""The controller actor: :class:`~agentrl.controller.core.ControllerCore` wired to the bus.

Inputs, all funnelled into one queue so the core sees one event at a time, and all durable: what the
accounting depends on is acked only after the state that counted it is saved in KV, so a controller that dies
at any moment gets it redelivered rather than lost (and the core handles every input idempotently):

* the durable consumer ``controller`` on the trajectory stream (finished episodes),
* the durable consumer ``controller-control`` on the control stream, typed messages from the learner:
  :class:`~agentrl.messages.BatchTaken` (trained-token staleness is recorded; APRIL aborts surplus),
  :class:`~agentrl.messages.TasksDropped` (finished tasks the learner will not train: replacements are
  admitted) and :class:`~agentrl.messages.WeightUpdate` (every engine is told to load the weights; then the
  admission version advances),
* the policy version in KV, polled (admission still advances if weights cannot reach the engines).

Outputs: tasks on ``tasks.new`` / ``tasks.eval`` (msg id ``f"{task.id}-{attempt}"``), abort broadcasts,
``metrics`` events plus a JSONL file and the run's tracking sinks (counters, staleness histogram, off-policy
token fraction, eval results, and the engines' idle fraction when an :class:`EngineLoad` sampler is given). The
core's state is saved to KV before any action is executed and again after, so a restarted controller
re-publishes exactly what may not have gone out. With engines configured, a reconcile loop reloads the
latest weights into engines that report an older version (e.g. after an engine restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any, cast

import nats.errors

from agentrl.bus import Bus, Consumer, Delivery
from agentrl.config.controller import ControllerConfig
from agentrl.config.training import TrainingConfig
from agentrl.controller.core import Action, ControllerCore, PublishTasks, Report
from agentrl.controller.dataset import PromptDataset
from agentrl.controller.engine_load import EngineLoad
from agentrl.controller.state import load_state, save_state
from agentrl.controller.weights_sync import WeightsSync
from agentrl.messages import BatchTaken, Event, TasksDropped, Trajectory, WeightUpdate
from agentrl.tracking import Tracking

ControlMessage = BatchTaken | TasksDropped | WeightUpdate

__all__ = ["Controller", "build_core"]

log = logging.getLogger(__name__)

_Item = tuple[str, Any]


async def build_core(bus: Bus, cfg: ControllerConfig, training: TrainingConfig, *, seed: int = 0) -> ControllerCore:
    """Load the datasets and the saved state (if any) and build the core."""
    dataset = await asyncio.to_thread(PromptDataset.load, cfg.dataset, seed=seed)
    eval_dataset = None
    if cfg.eval.dataset is not None:
        eval_dataset = await asyncio.to_thread(PromptDataset.load, cfg.eval.dataset, seed=seed)
    state = await load_state(bus)
    if state is not None:
        log.info("controller: resuming from saved state at version %d (%d running)", state.version, len(state.running))
    return ControllerCore(cfg, training, dataset, state, eval_dataset)


class Controller:
    """Runs the core against ``bus`` until :meth:`stop` (or, with ``exit_when_done``, until every task finished)."""

    def __init__(
        self, bus: Bus, core: ControllerCore, *, weights: WeightsSync | None = None,
        engine_load: EngineLoad | None = None, metrics_path: Path | None = None, version_poll_s: float = 1.0,
        weights_grace_s: float = 10.0, tracking: Tracking | None = None,
    ) -> None:
        self.bus = bus
        self.core = core
        self.cfg = core.cfg
        self.weights = weights
        self.engine_load = engine_load
        self.metrics_path = metrics_path
        self.tracking = tracking or Tracking()  # TensorBoard / W&B, stepped by policy version
        self.version_poll_s = version_poll_s
        self.weights_grace_s = weights_grace_s
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._stop = asyncio.Event()
        self._closing = asyncio.Event()  # input loops end once this is set (even if a cancel was swallowed)
        self._kv_ahead_since: float | None = None

    def stop(self) -> None:
        self._stop.set()

    async def run(self, *, exit_when_done: bool = False) -> None:
        subjects = self.bus.subjects
        consumer = await self.bus.consumer(subjects.traj, durable="controller", typ=Trajectory, ack_wait=60.0)
        control: Consumer[Any] = await self.bus.consumer(
            subjects.control_all, durable="controller-control", typ=cast(Any, ControlMessage), ack_wait=60.0)
        loops = [self._fetch(consumer, "traj"), self._fetch(control, "control"), self._poll_version(), self._tick()]
        if self.engine_load is not None:
            loops.append(self._sample_engines(self.engine_load))
        if self.weights is not None:
            loops.append(self._reconcile_weights(self.weights))
        feeders = [asyncio.create_task(f) for f in loops]
        try:
            await self._handle([("version", await self.bus.get_version())], initial=True)
            while not self._stop.is_set() and not (exit_when_done and await self._books_closed(control)):
                items = await self._next_items()
                if items:
                    await self._handle(items)
            await self._publish_metrics()
        finally:
            self._closing.set()
            for f in feeders:
                f.cancel()
            # bounded: a cancellation swallowed inside nats-py's wait_for must not hang shutdown
            _, stuck = await asyncio.wait(feeders, timeout=5.0)
            if stuck:
                log.warning("controller: %d input loops did not stop in 5 s", len(stuck))
            for c in (consumer, control):
                with contextlib.suppress(nats.errors.Error):
                    await c.unsubscribe()
            # no final save: every handled batch of events was saved before its actions and acks

    async def _books_closed(self, control: Consumer[Any]) -> bool:
        """``core.done``, and no control message still owed. A controller restarted after a kill gets what its
        predecessor was handed but never acked only after ``ack_wait``, behind later messages: the learner's last
        ``batch_taken`` can arrive before an earlier one, which must still be counted."""
        if not self.core.done:
            return False
        try:
            return await control.outstanding() == 0
        except (nats.errors.Error, TimeoutError):  # unreachable for now: not provably closed
            return False

    # ------------------------------------------------------------ inputs

    async def _next_items(self) -> list[_Item]:
        with contextlib.suppress(TimeoutError):
            first = await asyncio.wait_for(self._queue.get(), timeout=0.5)
            items = [first]
            while not self._queue.empty():
                items.append(self._queue.get_nowait())
            return items
        return []

    async def _fetch(self, consumer: Any, kind: str) -> None:
        while not self._closing.is_set():
            try:
                deliveries = await consumer.fetch(batch=256, timeout=1.0)
            except TimeoutError:  # nats-py may raise the bare asyncio timeout on an empty pull
                deliveries = []
            if deliveries:
                done = asyncio.get_running_loop().create_future()
                self._queue.put_nowait((kind, (deliveries, done)))
                await done  # next fetch only after these are saved and acked

    async def _poll_version(self) -> None:
        while not self._closing.is_set():
            await asyncio.sleep(self.version_poll_s)
            self._queue.put_nowait(("version", await self.bus.get_version()))

    async def _sample_engines(self, load: EngineLoad) -> None:
        while not self._closing.is_set():
            await asyncio.sleep(self.version_poll_s)
            await load.sample()

    async def _tick(self) -> None:
        while not self._closing.is_set():
            await asyncio.sleep(self.cfg.metrics_interval_s)
            self._queue.put_nowait(("metrics", None))

    # ------------------------------------------------------------ dispatch

    async def _handle(self, items: list[_Item], *, initial: bool = False) -> None:
        actions: list[Action] = self.core.start() if initial else []
        acks: list[tuple[list[Delivery[Any]], asyncio.Future[None]]] = []
        metrics = False
        for kind, payload in items:
            if kind in ("traj", "control"):
                deliveries, done = payload
                acks.append((deliveries, done))
                for d in deliveries:
                    actions += await self._on_message(d.msg)
            elif kind == "version":
                actions += self._kv_version(int(payload), initial)
            elif kind == "metrics":
                metrics = True
        await save_state(self.bus, self.core.state)  # before acting: a crash now re-publishes on restart
        await self._act(actions)
        for deliveries, done in acks:
            await asyncio.gather(*(d.ack() for d in deliveries))
            done.set_result(None)
        if metrics:
            await self._publish_metrics()

    async def _reconcile_weights(self, weights: WeightsSync, every_s: float = 2.0) -> None:
        """Engines that restart come back with their initial weights: reload the latest into them."""
        while not self._closing.is_set():
            await asyncio.sleep(every_s)
            await weights.reconcile()

    async def _on_message(self, msg: Trajectory | ControlMessage) -> list[Action]:
        if isinstance(msg, Trajectory):
            return self.core.on_trajectory(msg)
        if isinstance(msg, BatchTaken):
            return self.core.on_batch_taken(msg)
        if isinstance(msg, TasksDropped):
            return self.core.on_dropped(msg.task_ids)
        return await self._weights(msg)

    async def _weights(self, update: WeightUpdate) -> list[Action]:
        if self.weights is not None:
            failed = await self.weights.load(update)
            if failed:
                log.error("controller: engines %s missed weights v%d; admitting anyway", failed, update.version)
        return self.core.on_version(update.version)

    def _kv_version(self, version: int, initial: bool) -> list[Action]:
        """The KV version advances admission directly without engines to sync, else after a grace period."""
        if version <= self.core.version:
            self._kv_ahead_since = None
            return []
        now = time.monotonic()
        self._kv_ahead_since = self._kv_ahead_since or now
        if initial or self.weights is None or now - self._kv_ahead_since >= self.weights_grace_s:
            self._kv_ahead_since = None
            return self.core.on_version(version)
        return []

    # ------------------------------------------------------------ outputs

    async def _act(self, actions: list[Action]) -> None:
        published = False
        for action in actions:
            if isinstance(action, PublishTasks) and action.tasks:
                ids = [f"{t.id}-{t.attempt}" for t in action.tasks]
                await self.bus.publish_many(self.bus.subjects.task(action.queue), list(action.tasks), msg_ids=ids)
                self.core.mark_published(t.id for t in action.tasks)
                published = True
            elif isinstance(action, Report):
                await self._emit(action.data, step=action.eval_version)
                self.core.mark_reported(action.eval_version)
                published = True
        if published:
            await save_state(self.bus, self.core.state)

    async def _publish_metrics(self) -> None:
        load = self.engine_load.report() if self.engine_load is not None else {}
        await self._emit({**flat_metrics(self.core.metrics()), **load}, step=self.core.state.version)

    async def _emit(self, data: dict[str, Any], *, step: int) -> None:
        line = {"time": time.time(), **data}
        if self.metrics_path is not None:
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            with self.metrics_path.open("a") as fh:
                fh.write(json.dumps(line) + "\n")
        self.tracking.log(data, step)
        await self.bus.publish_event(Event(type="metrics", source="controller", data=line))


def flat_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Nested histograms become one key per bucket (``controller/staleness_hist/2``), so every value is a number."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update({f"{key}/{k}": float(v) for k, v in value.items()})
        else:
            out[key] = float(value)
    return out
