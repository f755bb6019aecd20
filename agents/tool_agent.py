"""Multi-turn tool-calling agent in the Qwen / Hermes format.

The model writes ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks;
the environment answers each with a ``tool`` message, which the chat template
renders as ``<tool_response>`` blocks. A turn without a tool call is the final
answer; the environment's ``step`` scores it. The episode is ``truncated`` after
``max_turns`` model turns, when the context budget is used up, or (by default) when
a response hits ``max_new_tokens``.

Resumable: the turn counter and reward so far live in ``ctx.state``.
"""

from __future__ import annotations

from agentrl.agent import AgentFn, EpisodeContext
from agentrl.agent.tools import parse_action
from agentrl.errors import ConfigError
from agentrl.messages import Task, Trajectory

__all__ = ["make_tool_agent", "run_episode"]


def make_tool_agent(*, max_turns: int = 8, max_context: int | None = None, stop_on_length: bool = True) -> AgentFn:
    """A tool agent with at most ``max_turns`` model turns (``task.metadata["max_turns"]`` overrides it).

    Its token budget per episode is the worker's (``worker.max_context_tokens``, by default the model's own
    context length, asked from the engines); ``max_context`` lowers it further.
    With ``stop_on_length=False`` a response cut by ``max_new_tokens`` is still acted on (the chat template's
    end-of-turn text is appended, masked) instead of ending the episode as ``truncated``."""

    async def run_episode(ctx: EpisodeContext, task: Task) -> Trajectory | None:
        env = ctx.env
        if env is None:
            raise ConfigError(f"tool agent: task {task.id} names no environment (task.env)")
        limit = int(task.metadata.get("max_turns", max_turns))
        ctx.max_context = min(filter(None, (ctx.max_context, max_context)), default=None)
        obs = await env.reset(task)
        ctx.start([*(task.prompt or []), *obs.messages], tools=obs.tools)
        while ctx.state.get("turns", 0) < limit:
            turn = await ctx.generate()
            ctx.state["turns"] = ctx.state.get("turns", 0) + 1
            if turn.finish_reason == "length" and stop_on_length:
                return ctx.finish(reward=ctx.state.get("reward", 0.0), status="truncated")
            result = await env.step(parse_action(turn.text))
            ctx.state["reward"] = ctx.state.get("reward", 0.0) + result.reward
            if result.done:
                return ctx.finish(reward=ctx.state["reward"], metadata=result.info)
            ctx.add_messages(result.observation.messages, kind="tool", reward=result.reward)
        return ctx.finish(reward=ctx.state.get("reward", 0.0), status="truncated",
                          metadata={"end_reason": f"max_turns={limit}"})

    return run_episode


run_episode = make_tool_agent()
