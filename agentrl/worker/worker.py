"""The agent worker: pulls Tasks, runs episodes concurrently on one event loop, publishes Trajectories.

Protocol (see DESIGN.md and the cross-actor protocol):

* tasks are pulled from ``tasks.resume`` > ``tasks.eval`` > ``tasks.new`` (durable
  consumers ``workers-<priority>`` shared by all workers), never more than the free
  episode slots;
* a finished episode's Trajectory is published on ``traj`` with ``msg_id`` = its id,
  then the task is acked — only after JetStream stored the trajectory; a failed
  publish naks the task so it is redelivered;
* ``Event(type="abort", data={"task_ids": [...]} | {"all": true})`` aborts matching
  episodes: the engine request is aborted, the episode ends with what it had, and a
  resume Task (same id, attempt + 1, partial rollout) is published on ``tasks.resume``
  before the original is acked. Shutdown does the same for every episode in flight;
* long episodes keep their task leased with ``in_progress`` heartbeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agentrl.agent.chat import ChatRenderer
from agentrl.agent.context import EpisodeContext
from agentrl.agent.runner import AgentFn, EpisodeOutcome, run_episode
from agentrl.bus import TASK_PRIORITIES, Bus, Consumer, Delivery, TaskPriority
from agentrl.config.worker import WorkerConfig
from agentrl.env.base import RewardFn
from agentrl.env.local import EnvProvider
from agentrl.errors import AgentRLError, DecodeError
from agentrl.generation import Generator
from agentrl.messages import Event, Task, decode

__all__ = ["AgentWorker", "WorkerStats"]

log = logging.getLogger(__name__)


@dataclass
class WorkerStats:
    started: int = 0
    published: int = 0  # trajectories stored (any status but aborted)
    requeued: int = 0  # aborted episodes re-queued as resume tasks
    failed: int = 0  # trajectories with status failed
    nacked: int = 0  # tasks handed back because their result could not be published


@dataclass
class _Running:
    ctx: EpisodeContext | None = None
    agent_task: asyncio.Task[EpisodeOutcome] | None = None
    abort_requested: bool = False  # an abort that arrived before the episode's context existed


class AgentWorker:
    """Runs ``agent`` on tasks from ``bus`` until :meth:`stop` (then aborts and re-queues what is in flight)."""

    def __init__(
        self,
        bus: Bus,
        *,
        agent: AgentFn,
        generator: Generator,
        chat: ChatRenderer,
        config: WorkerConfig,
        envs: EnvProvider | None = None,
        reward: RewardFn | None = None,
        worker_id: str = "worker",
    ) -> None:
        self.bus = bus
        self.agent = agent
        self.generator = generator
        self.chat = chat
        self.config = config
        self.envs = envs
        self.reward = reward
        self.worker_id = worker_id
        self.stats = WorkerStats()
        self._running: dict[str, _Running] = {}
        self._episodes: set[asyncio.Task[None]] = set()
        self._aborts: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._slot_freed = asyncio.Event()

    @property
    def in_flight(self) -> int:
        return len(self._episodes)

    def stop(self) -> None:
        """Ask :meth:`run` to stop taking tasks, abort what is running and return."""
        self._stopping.set()

    # ------------------------------------------------------------ main loop

    async def run(self) -> WorkerStats:
        consumers = {
            p: await self.bus.consumer(self.bus.subjects.task(p), durable=f"workers-{p}", typ=Task)
            for p in TASK_PRIORITIES
        }
        abort_sub = await self.bus.nc.subscribe(self.bus.subjects.events("abort"), cb=self._on_abort)
        log.info("worker %s: up to %d episodes at once", self.worker_id, self.config.concurrency)
        try:
            while not self._stopping.is_set():
                free = self.config.concurrency - len(self._episodes)
                if free <= 0:
                    await self._wait_for_slot()
                    continue
                for delivery in await self._poll(consumers, free):
                    self._spawn(delivery)
        finally:
            with contextlib.suppress(Exception):
                await abort_sub.unsubscribe()
            await self._drain()
            for consumer in consumers.values():
                with contextlib.suppress(Exception):
                    await consumer.unsubscribe()
        return self.stats

    async def _wait_for_slot(self) -> None:
        self._slot_freed.clear()
        stop = asyncio.ensure_future(self._stopping.wait())
        freed = asyncio.ensure_future(self._slot_freed.wait())
        await asyncio.wait({stop, freed}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        freed.cancel()

    async def _poll(self, consumers: Mapping[TaskPriority, Consumer[Task]], free: int) -> list[Delivery[Task]]:
        """Tasks in priority order: resume and eval are checked briefly, new waits up to poll_timeout_s.

        A pull cannot be interrupted without risking a message delivered to a cancelled request, so the
        wait for new tasks is kept short: it bounds how long a resume or eval task waits behind it."""
        for priority in TASK_PRIORITIES:
            wait = self.config.poll_timeout_s if priority == "new" else 0.02
            try:
                found = await consumers[priority].fetch(batch=free, timeout=wait)
            except TimeoutError:  # nats-py sometimes raises instead of returning nothing
                found = []
            except Exception as exc:  # a bus hiccup must not kill the worker; retry after a pause
                log.warning("worker %s: fetch from %s failed: %r", self.worker_id, priority, exc)
                await asyncio.sleep(min(1.0, self.config.poll_timeout_s))
                return []
            if found:
                return found
        return []

    def _spawn(self, delivery: Delivery[Task]) -> None:
        task = asyncio.create_task(self._episode(delivery))
        self._episodes.add(task)
        task.add_done_callback(self._episode_done)

    def _episode_done(self, task: asyncio.Task[None]) -> None:
        self._episodes.discard(task)
        self._slot_freed.set()

    # ------------------------------------------------------------ one episode

    async def _episode(self, delivery: Delivery[Task]) -> None:
        task = delivery.msg
        running = self._running[task.id] = _Running()
        heartbeat = asyncio.create_task(self._heartbeat(delivery))
        self.stats.started += 1
        try:
            running.agent_task = asyncio.create_task(self._run_agent(task, running))
            outcome = await running.agent_task
            await self._publish(outcome)
            await delivery.ack()
        except Exception as exc:  # could not publish or ack: hand the task back for another try
            self.stats.nacked += 1
            log.warning("worker %s: task %s not completed (%s); nak", self.worker_id, task.id, exc)
            with contextlib.suppress(Exception):
                await delivery.nak(delay=1.0)
        finally:
            heartbeat.cancel()
            self._running.pop(task.id, None)

    async def _run_agent(self, task: Task, running: _Running) -> EpisodeOutcome:
        def keep(ctx: EpisodeContext) -> None:
            running.ctx = ctx
            if self._stopping.is_set() or running.abort_requested:  # it resumes later, maybe elsewhere
                ctx.request_abort()

        return await run_episode(
            self.agent, task, generator=self.generator, chat=self.chat, envs=self.envs, reward=self.reward,
            timeout=self.config.episode_timeout_s, max_context=self.config.max_context_tokens or None,
            worker_id=self.worker_id, on_start=keep,
        )

    async def _publish(self, outcome: EpisodeOutcome) -> None:
        if outcome.resume is not None:
            resume = outcome.resume
            await self.bus.publish(self.bus.subjects.task("resume"), resume,
                                   msg_id=f"resume-{resume.id}-{resume.attempt}")
            self.stats.requeued += 1
            return
        traj = outcome.trajectory
        await self.bus.publish(self.bus.subjects.traj, traj, msg_id=traj.id)
        self.stats.published += 1
        if traj.status == "failed":
            self.stats.failed += 1

    async def _heartbeat(self, delivery: Delivery[Task]) -> None:
        period = max(0.5, self.bus.config.ack_wait_s / 3)
        while True:
            await asyncio.sleep(period)
            with contextlib.suppress(Exception):
                await delivery.in_progress()

    # ------------------------------------------------------------ aborts and shutdown

    async def _on_abort(self, msg: Any) -> None:
        try:
            event: Event = decode(msg.data, Event)
        except DecodeError as exc:
            log.warning("worker %s: ignoring undecodable abort event: %s", self.worker_id, exc)
            return
        if event.data.get("all"):
            ids = list(self._running)
        else:
            ids = [i for i in event.data.get("task_ids", []) if i in self._running]
        for task_id in ids:
            task = asyncio.create_task(self.abort(task_id))
            self._aborts.add(task)
            task.add_done_callback(self._aborts.discard)

    async def abort(self, task_id: str) -> None:
        """Abort one running episode; cancel it if it has not ended within ``abort_grace_s``."""
        running = self._running.get(task_id)
        if running is None:
            return
        running.abort_requested = True
        if running.ctx is None or running.agent_task is None:
            return
        try:
            await running.ctx.abort()
        except AgentRLError as exc:  # the engine may be gone; the cancel below still ends the episode
            log.warning("worker %s: engine abort for %s failed: %s", self.worker_id, task_id, exc)
        done, _ = await asyncio.wait({running.agent_task}, timeout=self.config.abort_grace_s)
        if not done:
            running.agent_task.cancel()

    async def _drain(self) -> None:
        """Abort every episode in flight; wait for their resume tasks to be published (bounded)."""
        if not self._episodes:
            return
        log.info("worker %s: stopping, aborting %d episodes", self.worker_id, len(self._episodes))
        await asyncio.gather(*(self.abort(tid) for tid in list(self._running)), return_exceptions=True)
        _, pending = await asyncio.wait(set(self._episodes), timeout=self.config.abort_grace_s + 15.0)
        for task in pending:  # unacked tasks are redelivered by JetStream after ack_wait
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5.0)
