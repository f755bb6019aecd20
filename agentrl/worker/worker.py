"""The agent worker: pulls Tasks, runs episodes concurrently on one event loop, publishes Trajectories.

Protocol (see docs/architecture.md):

* tasks are pulled from ``tasks.resume`` > ``tasks.eval`` > ``tasks.new`` (durable
  consumers ``workers-<priority>`` shared by all workers), never more than the free
  episode slots;
* a finished episode's Trajectory is published on ``traj`` with ``msg_id`` = its id,
  then the task is acked — only after JetStream stored the trajectory; a failed
  publish naks the task so it is redelivered;
* an :class:`~agentrl.messages.AbortRequest` (or an engine that aborts its requests, e.g. to load
  weights) ends the current attempt where the engine stopped: the aborted attempt is published
  (``status="aborted"``: visible to inspection, never trained) and the episode resumes at once,
  token for token, on this worker and on the very same environment. A stopping worker instead
  publishes a resume Task (attempt + 1, partial rollout, the environment carried along —
  :mod:`agentrl.env.episode` — or, if it cannot be, no partial) on ``tasks.resume`` before acking;
* an infrastructure failure (no engine, env worker gone, timeouts) is not an outcome: the task is
  handed back with backoff (``nak``) up to ``worker.infra_retries`` times, then published as
  ``failed`` (never trained: the learner drops it and the controller admits a replacement);
* long episodes keep their task leased with ``in_progress`` heartbeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from agentrl.agent.chat import ChatRenderer
from agentrl.agent.context import EpisodeContext
from agentrl.agent.runner import AgentFn, EpisodeOutcome, run_episode
from agentrl.bus import TASK_PRIORITIES, Bus, Consumer, Delivery, TaskPriority
from agentrl.config.worker import WorkerConfig
from agentrl.env.base import RewardFn
from agentrl.env.episode import EpisodeEnv, carry
from agentrl.env.local import EnvProvider
from agentrl.errors import AgentRLError, DecodeError
from agentrl.generation import Generator
from agentrl.messages import AbortRequest, EnvResume, Task, Trajectory, decode

__all__ = ["AgentWorker", "WorkerStats"]

log = logging.getLogger(__name__)


@dataclass
class WorkerStats:
    started: int = 0
    published: int = 0  # trajectories stored (any status, aborted attempts included)
    resumed_here: int = 0  # aborted episodes resumed on this worker, on their own environment
    requeued: int = 0  # aborted episodes handed to the resume queue (the worker was stopping)
    failed: int = 0  # trajectories with status failed
    retried: int = 0  # tasks handed back after an infrastructure failure
    nacked: int = 0  # tasks handed back because their result could not be published


class _Retry(Exception):
    """An infrastructure failure the task should be retried after."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def _carry_quietly(env: EpisodeEnv) -> EnvResume | None:
    try:
        return await carry(env)
    except Exception as exc:  # a snapshot that fails only costs a restart from scratch
        log.warning("could not carry an environment to another worker (%r); its episode restarts", exc)
        return None


async def _close_quietly(env: EpisodeEnv) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(10.0):
            await env.close()


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
        """Run a task to its end: an aborted attempt is published and resumed right here on the same
        environment; an infrastructure failure hands the task back for a retry (bounded)."""
        task = delivery.msg
        running = self._running[task.id] = _Running()
        heartbeat = asyncio.create_task(self._heartbeat(delivery))
        self.stats.started += 1
        env: EpisodeEnv | None = None
        try:
            while True:
                running.abort_requested = False
                running.agent_task = asyncio.create_task(self._run_agent(task, running, env))
                outcome = await running.agent_task
                env = outcome.env
                if outcome.resume is None:
                    break
                await self._publish_trajectory(outcome.trajectory)  # the aborted attempt, for inspection
                if self._stopping.is_set():
                    await self._requeue(outcome)
                    env = None
                    break
                task = outcome.resume
                self.stats.resumed_here += 1
            if outcome.resume is None:
                await self._finish(delivery, outcome)
            await delivery.ack()
        except _Retry as retry:
            await self._retry(delivery, retry.reason)
        except Exception as exc:  # could not publish or ack: hand the task back for another try
            self.stats.nacked += 1
            log.warning("worker %s: task %s not completed (%s); nak", self.worker_id, task.id, exc)
            with contextlib.suppress(Exception):
                await delivery.nak(delay=1.0)
        finally:
            heartbeat.cancel()
            self._running.pop(task.id, None)
            if env is not None:
                await _close_quietly(env)

    async def _run_agent(self, task: Task, running: _Running, env: EpisodeEnv | None) -> EpisodeOutcome:
        def keep(ctx: EpisodeContext) -> None:
            running.ctx = ctx
            if self._stopping.is_set() or running.abort_requested:  # it resumes later, maybe elsewhere
                ctx.request_abort()

        return await run_episode(
            self.agent, task, generator=self.generator, chat=self.chat, envs=self.envs, reward=self.reward,
            timeout=self.config.episode_timeout_s, max_context=self.config.max_context_tokens or None,
            worker_id=self.worker_id, on_start=keep, env=env,
        )

    async def _finish(self, delivery: Delivery[Task], outcome: EpisodeOutcome) -> None:
        """Publish the finished trajectory; an infrastructure failure is retried first (never trained)."""
        if outcome.infra is not None and delivery.num_delivered <= self.config.infra_retries:
            raise _Retry(outcome.infra)
        await self._publish_trajectory(outcome.trajectory)

    async def _retry(self, delivery: Delivery[Task], reason: str) -> None:
        """Hand the task back with backoff: JetStream redelivers it (to any worker) after the delay."""
        self.stats.retried += 1
        delay = min(self.config.infra_backoff_s * 2 ** (delivery.num_delivered - 1), 30.0)
        log.warning("worker %s: task %s hit an infrastructure failure (%s); retry in %.1fs",
                    self.worker_id, delivery.msg.id, reason.splitlines()[-1][:200], delay)
        with contextlib.suppress(Exception):
            await delivery.nak(delay=delay)

    async def _requeue(self, outcome: EpisodeOutcome) -> None:
        """Hand an aborted episode to any worker: its environment carried along, or else restarted from scratch."""
        resume = outcome.resume
        assert resume is not None
        if outcome.env is not None and resume.partial is not None:
            carried = await _carry_quietly(outcome.env)
            resume = msgspec.structs.replace(
                resume, partial=None if carried is None else msgspec.structs.replace(resume.partial, env=carried))
            if carried is None or carried.mode != "session":
                await _close_quietly(outcome.env)
        await self.bus.publish(self.bus.subjects.task("resume"), resume, msg_id=f"resume-{resume.id}-{resume.attempt}")
        self.stats.requeued += 1

    async def _publish_trajectory(self, traj: Trajectory) -> None:
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
            request: AbortRequest = decode(msg.data, AbortRequest)
        except DecodeError as exc:
            log.warning("worker %s: ignoring undecodable abort request: %s", self.worker_id, exc)
            return
        ids = list(self._running) if request.all else [i for i in request.task_ids if i in self._running]
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
