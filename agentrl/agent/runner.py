"""Run one episode of an agent function and turn every way it can end into a result.

``run_episode`` is the single place where an episode's lifecycle lives: open the
environment, set the per-episode ``ContextVar``, call the agent under a timeout,
close the environment, and map the ending to a trajectory status:

==============================  =============  =====================================
ending                          status         notes
==============================  =============  =====================================
agent returned a trajectory     as returned
agent returned ``None``         ``failed``     ``metadata["rejected"] = True``
context budget used up          ``truncated``
episode timeout / env timeout   ``truncated``  reason in an ``error`` turn
env crashed / env error         ``failed``     reason in an ``error`` turn
agent raised                    ``failed``     traceback in an ``error`` turn
aborted (APRIL / shutdown)      ``aborted``    plus a resume Task (attempt + 1, partial rollout)
==============================  =============  =====================================

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
from agentrl.env.base import Environment, RewardFn
from agentrl.env.local import EnvProvider
from agentrl.errors import EnvError, EnvTimeout
from agentrl.generation import Generator
from agentrl.messages import Task, Trajectory, TrajectoryStatus

__all__ = ["AgentFn", "EpisodeOutcome", "run_episode"]

AgentFn = Callable[[EpisodeContext, Task], Awaitable[Trajectory | None]]
"""``async def run_episode(ctx, task) -> Trajectory | None`` — the agent extension point."""

_ENV_CLOSE_TIMEOUT_S = 10.0
log = logging.getLogger(__name__)


@dataclass(slots=True)
class EpisodeOutcome:
    """How an episode ended: its trajectory, and for an aborted one the task that resumes it."""

    trajectory: Trajectory
    resume: Task | None = None
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
) -> EpisodeOutcome:
    """Run ``agent`` on ``task`` to the end; never raises except ``CancelledError`` not caused by an abort.

    ``on_start`` is called with the context before the agent runs (the worker keeps it to abort the episode).
    """
    t0 = time.perf_counter()
    env: Environment | None = None
    ctx = EpisodeContext(task, generator=generator, chat=chat, reward=reward, max_context=max_context,
                         worker_id=worker_id)
    if on_start is not None:
        on_start(ctx)
    token = _current.set(ctx)
    try:
        if task.env and envs is not None:
            env = ctx.env = envs.open(task.env, ctx.trajectory_id)
        outcome = await _run(agent, ctx, timeout)
    finally:
        _current.reset(token)
        if env is not None:
            await _close(env, ctx)
    outcome.seconds = time.perf_counter() - t0
    return outcome


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
            return _ended(ctx, "truncated", f"episode timeout after {timeout}s")
        return _ended(ctx, "failed", _traceback(exc))
    except EnvTimeout as exc:
        return _ended(ctx, "truncated", f"environment timeout: {exc}")
    except EnvError as exc:
        return _ended(ctx, "failed", f"environment error ({type(exc).__name__}): {exc}")
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


def _aborted(ctx: EpisodeContext, *, at_safe_point: bool) -> EpisodeOutcome:
    """The aborted trajectory, and a resume task continuing from where it stopped (or from scratch)."""
    point = ctx.partial_state(at_safe_point=at_safe_point)
    partial = None
    if point is not None:
        length, num_turns, state = point
        ctx.traj.truncate(length, num_turns)
        ctx.state = state
        partial = ctx.traj.to_partial(state)
    task = ctx.task
    resume = msgspec.structs.replace(task, attempt=task.attempt + 1, partial=partial)
    return EpisodeOutcome(ctx.finish(status="aborted"), resume=resume)


async def _close(env: Environment, ctx: EpisodeContext) -> None:
    try:
        async with asyncio.timeout(_ENV_CLOSE_TIMEOUT_S):
            await env.close()
    except (Exception, TimeoutError) as exc:
        # The episode's result stands; a failing close is logged, not raised.
        log.warning("episode %s: environment close failed: %s: %s", ctx.trajectory_id, type(exc).__name__, exc)
