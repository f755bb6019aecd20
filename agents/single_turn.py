"""Single-turn agent: one model response to the prompt, scored by the environment or a reward function."""

from __future__ import annotations

from typing import Any

from agentrl.agent import EpisodeContext
from agentrl.env.base import Action
from agentrl.errors import ConfigError
from agentrl.messages import Task, Trajectory, TrajectoryStatus


async def run_episode(ctx: EpisodeContext, task: Task) -> Trajectory | None:
    """Generate once; the reward comes from ``ctx.env.step`` if there is an env, else from ``ctx.reward``."""
    if ctx.env is not None:
        obs = await ctx.env.reset(task)
        ctx.start([*(task.prompt or []), *obs.messages], tools=obs.tools)
    else:
        ctx.start()
    turn = await ctx.generate()
    info: dict[str, Any] = {}
    if ctx.env is not None:
        result = await ctx.env.step(Action(text=turn.text))
        reward, info = result.reward, result.info
    elif ctx.reward is not None:
        reward = await ctx.reward(task, turn.text)
    else:
        raise ConfigError("single_turn agent: needs an environment (task.env) or a reward function (worker.reward)")
    status: TrajectoryStatus = "truncated" if turn.finish_reason == "length" else "completed"
    return ctx.finish(reward=reward, status=status, metadata=info)
