"""Multi-turn kernel agent: write a Triton solution, read the evaluation's feedback, try again.

Each turn the model writes a reply (its last code block is the solution); the environment
(:class:`envs.kernelgen.KernelEnv`) evaluates it and answers with feedback — the compiler or runtime
error, the mismatch, the crash, the rule broken, or the timing — which is appended as a ``user`` message
(masked) before the next turn. The episode stops after ``max_turns`` turns (default 3,
``task.metadata["max_turns"]`` overrides it) or as soon as the environment says ``done`` (correct and fast
enough).

Resume after an APRIL abort: every scored turn's result lives in ``ctx.state["turns"]``, so a resumed
episode continues with the next turn and never evaluates a scored one again; with a snapshottable
environment the agent also keeps its snapshot in ``ctx.state["env"]`` and puts it back on resume, so the
environment's history always matches the trajectory's turns.

The trajectory's reward is the environment's multi-turn credit (``episode_reward``: last, best or
improvement); ``metadata["correct"]`` says whether any turn was correct, ``metadata["turns"]`` how many
turns were evaluated and ``metadata["outcomes"]`` how each ended.
"""

from __future__ import annotations

from typing import Any

from agentrl.agent import AgentFn, EpisodeContext
from agentrl.env.base import Action, Snapshottable
from agentrl.errors import ConfigError
from agentrl.messages import Task, Trajectory

__all__ = ["make_kernel_agent", "run_episode"]


def make_kernel_agent(*, max_turns: int = 3, max_context: int = 8192) -> AgentFn:
    """A kernel agent of at most ``max_turns`` turns and ``max_context`` tokens (the worker's limit wins)."""
    if max_turns < 1:
        raise ConfigError(f"kernel agent: max_turns={max_turns}; expected >= 1")

    async def run_episode(ctx: EpisodeContext, task: Task) -> Trajectory | None:
        env = ctx.env
        if env is None:
            raise ConfigError(f"kernel agent: task {task.id} names no environment (task.env)")
        limit = int(task.metadata.get("max_turns", max_turns))
        ctx.max_context = ctx.max_context or max_context
        obs = await env.reset(task)
        if ctx.resumed and "env" in ctx.state and isinstance(env, Snapshottable):
            await env.restore(ctx.state["env"])
        ctx.start([*(task.prompt or []), *obs.messages])
        turns: list[dict[str, Any]] = ctx.state.setdefault("turns", [])
        while len(turns) < limit and not (turns and turns[-1]["done"]):
            turn = await ctx.generate()
            result = await env.step(Action(text=turn.text))
            turns.append({"score": result.reward, "done": result.done, "correct": bool(result.info.get("correct")),
                          "outcome": result.info.get("outcome"), "reward": result.info.get("episode_reward", 0.0)})
            if isinstance(env, Snapshottable):
                ctx.state["env"] = await env.snapshot()
            if len(turns) < limit and not result.done:
                ctx.add_messages(result.observation.messages, kind="env", reward=result.reward)
        return ctx.finish(reward=float(turns[-1]["reward"]) if turns else 0.0, metadata=_summary(turns))

    return run_episode


def _summary(turns: list[dict[str, Any]]) -> dict[str, Any]:
    return {"correct": any(t["correct"] for t in turns), "turns": len(turns),
            "outcomes": [t["outcome"] for t in turns], "scores": [t["score"] for t in turns]}


run_episode = make_kernel_agent()
