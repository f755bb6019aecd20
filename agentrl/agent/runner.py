"""Run one episode of an agent function and turn every way it can end into a result.

``run_episode`` is the single place where an episode's lifecycle lives: open (or get back) the environment,
set the per-episode ``ContextVar``, call the agent under a timeout, close the environment, and map the ending
to a trajectory status:

==============================  =============  ===================================================
ending                          status         notes
==============================  =============  ===================================================
agent returned a trajectory     as returned
agent returned ``None``         ``failed``     ``metadata["rejected"] = True``
context budget used up          ``truncated``  a policy outcome
no engine, engine/env timeout,  ``failed``     an infrastructure failure (``EpisodeOutcome.infra``):
env worker gone, env raised                    the worker retries the task; never training data
agent raised, engine said 4xx   ``failed``     traceback in an ``error`` turn; never training data
aborted (APRIL / shutdown)      ``aborted``    plus a resume task (attempt + 1, partial rollout)
==============================  =============  ===================================================

An aborted episode keeps its :class:`~agentrl.env.episode.EpisodeEnv` in ``EpisodeOutcome.env``: the worker
resumes it on the same environment, or carries the environment to another worker. The resume point is the end
of what the engine returned (an engine abort), or, when the episode had to be cancelled, the start of its last
``generate`` call — unless an environment step began after that point, in which case the environment may have
changed in a way the rolled-back conversation does not show, and the episode restarts from scratch.

Nothing here touches the bus; the agent worker publishes what this returns.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import msgspec

from agentrl.agent.chat import ChatRenderer
from agentrl.agent.context import ContextExhausted, EpisodeAborted, EpisodeContext, _current
from agentrl.env.base import RewardFn
from agentrl.env.episode import EpisodeEnv, reopen
from agentrl.env.local import EnvProvider
from agentrl.errors import EngineError, EngineRequestError, EnvError
from agentrl.generation import Generator
from agentrl.messages import Task, Trajectory, TrajectoryStatus, Turn

__all__ = ["AgentFn", "EpisodeOutcome", "run_episode"]

AgentFn = Callable[[EpisodeContext, Task], Awaitable[Trajectory | None]]
"""``async def run_episode(ctx, task) -> Trajectory | None`` — the agent extension point."""

_ENV_CLOSE_TIMEOUT_S = 10.0
log = logging.getLogger(__name__)


@dataclass(slots=True)
class EpisodeOutcome:
    """How an episode ended: its trajectory; for an aborted one the task that resumes it and its environment
    (open, owned by the caller now); for an infrastructure failure, what failed."""

    trajectory: Trajectory
    resume: Task | None = None
    env: EpisodeEnv | None = None
    infra: str | None = None
    seconds: float = 0.0


async def run_episode(
    agent: AgentFn,
    task: Task,
    *,
    generator: Generator,
    chat: ChatRenderer,
    envs: EnvProvider | None = None,
    reward: RewardFn | None = None,
    timeout: float | None = None,
    max_context: int | None = None,
    worker_id: str = "",
    on_start: Callable[[EpisodeContext], None] | None = None,
    env: EpisodeEnv | None = None,
) -> EpisodeOutcome:
    """Run ``agent`` on ``task`` to the end; never raises except ``CancelledError`` not caused by an abort.

    ``env`` is the environment kept from the task's aborted attempt (the same worker resumes it); without it
    the environment is opened, or reopened from what the partial rollout carried. ``on_start`` is called with
    the context before the agent runs (the worker keeps it to abort the episode).
    """
    t0 = time.perf_counter()
    if env is None and task.env and envs is not None:
        task, env = await _open_env(task, envs)
    ctx = EpisodeContext(task, generator=generator, chat=chat, reward=reward, max_context=max_context,
                         worker_id=worker_id)
    ctx.env = env
    if on_start is not None:
        on_start(ctx)
    token = _current.set(ctx)
    outcome: EpisodeOutcome | None = None
    try:
        outcome = await _run(agent, ctx, timeout)
    finally:
        _current.reset(token)
        if env is not None and (outcome is None or outcome.env is not env):
            await _close(env, ctx)
    outcome.seconds = time.perf_counter() - t0
    return outcome


async def _open_env(task: Task, envs: EnvProvider) -> tuple[Task, EpisodeEnv]:
    """A fresh environment, or the resumed task's environment as its aborted part left it. When that cannot be
    had (an env worker's session expired), the episode restarts from scratch on a fresh one."""
    session = f"{task.id}-{task.attempt}"
    carried = task.partial.env if task.partial is not None else None
    if carried is None:
        return task, EpisodeEnv(envs.open(task.env, session))
    try:
        fresh = None if carried.mode == "session" else envs.open(task.env, session)
        return task, await reopen(carried, task, fresh, envs)
    except EnvError as exc:
        log.warning("task %s: cannot resume its environment (%s); restarting the episode", task.id, exc)
        return msgspec.structs.replace(task, partial=None), EpisodeEnv(envs.open(task.env, session))


async def _run(agent: AgentFn, ctx: EpisodeContext, timeout: float | None) -> EpisodeOutcome:
    try:
        async with asyncio.timeout(timeout) as deadline:
            traj = await agent(ctx, ctx.task)
    except EpisodeAborted:
        return _aborted(ctx, at_safe_point=False)
    except asyncio.CancelledError:
        if not ctx.abort_requested:
            raise
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        return _aborted(ctx, at_safe_point=True)
    except ContextExhausted as exc:
        return _ended(ctx, "truncated", f"context budget: {exc}")
    except TimeoutError as exc:
        if deadline.expired():
            return _infra(ctx, f"episode timeout after {timeout}s")
        return _ended(ctx, "failed", _traceback(exc))
    except EngineRequestError as exc:  # the engine refused the request itself: retrying cannot help
        return _ended(ctx, "failed", f"engine refused the request: {exc}")
    except (EngineError, EnvError) as exc:
        return _infra(ctx, f"{type(exc).__name__}: {exc}")
    except Exception as exc:
        return _ended(ctx, "failed", _traceback(exc))
    if traj is None:
        ctx.log_error("episode rejected by the agent")
        return EpisodeOutcome(ctx.finish(status="failed", metadata={"rejected": True}))
    return EpisodeOutcome(traj)


def _traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)).rstrip()


def _ended(ctx: EpisodeContext, status: TrajectoryStatus, reason: str) -> EpisodeOutcome:
    ctx.log_error(reason)
    return EpisodeOutcome(ctx.finish(status=status, metadata={"end_reason": reason.splitlines()[-1][:500]}))


def _infra(ctx: EpisodeContext, reason: str) -> EpisodeOutcome:
    """An infrastructure failure: not an outcome of the policy. The worker retries the task."""
    outcome = _ended(ctx, "failed", reason)
    outcome.trajectory.metadata["infra"] = reason.splitlines()[-1][:500]
    outcome.infra = reason
    return outcome


def _aborted(ctx: EpisodeContext, *, at_safe_point: bool) -> EpisodeOutcome:
    """The aborted attempt's trajectory, and a resume task continuing from where it stopped (or from scratch)."""
    point = ctx.partial_state(at_safe_point=at_safe_point)
    env = ctx.env if isinstance(ctx.env, EpisodeEnv) else None
    if point is not None and env is not None and env.steps_started != point.env_steps:
        point = None  # an env step began after the resume point: the env may have moved; start over
    partial = None
    if point is not None:
        ctx.traj.truncate(point.length, point.turns)
        ctx.state = point.state
        n = len(ctx.traj)
        ctx.traj.turns.append(Turn(kind="abort", start=n, end=n, info={"attempt": ctx.task.attempt}))
        partial = ctx.traj.to_partial(point.state)
    task = ctx.task
    resume = msgspec.structs.replace(task, attempt=task.attempt + 1, partial=partial)
    keep = env if partial is not None else None
    if keep is not None:
        keep.keep_for_resume()
    return EpisodeOutcome(ctx.finish(status="aborted"), resume=resume, env=keep)


async def _close(env: EpisodeEnv, ctx: EpisodeContext) -> None:
    try:
        async with asyncio.timeout(_ENV_CLOSE_TIMEOUT_S):
            await env.close()
    except (Exception, TimeoutError) as exc:
        # The episode's result stands; a failing close is logged, not raised.
        log.warning("episode %s: environment close failed: %s: %s", ctx.trajectory_id, type(exc).__name__, exc)
