"""A tool-calling agent written with the plain ``openai`` client, trained through the worker's recording proxy.

Nothing here knows about tokens: the agent talks to ``ctx.openai_base_url`` as to any OpenAI server, passes the
environment's tools as OpenAI ``tools``, runs each returned ``tool_call`` in the environment and sends the result
back as a ``tool`` message with its ``tool_call_id``. The proxy records every call into the trajectory exactly
as the engine consumed and produced it (:mod:`agentrl.proxy`), so this agent trains on the same tokens as
:mod:`agents.tool_agent` would. A reply without tool calls is the final answer; the environment scores it.

Resumable without resume code: after an abort the function runs again from the start, the proxy answers the
calls it had answered with the recorded replies and continues the cut one token for token.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from weakref import WeakKeyDictionary

import msgspec
from openai import AsyncOpenAI, omit

from agentrl.agent import AgentFn, EpisodeContext
from agentrl.env.base import Action, Environment, ToolCall
from agentrl.errors import ConfigError
from agentrl.messages import Task, Trajectory

__all__ = ["make_openai_agent", "run_episode"]


def _action(message: Any) -> Action:
    """The environment's view of an OpenAI assistant message."""
    calls = []
    for call in message.tool_calls or []:
        try:
            arguments = json.loads(call.function.arguments or "{}")
        except json.JSONDecodeError:
            return Action(text=message.content or "", error=f"tool call {call.id}: arguments are not JSON")
        calls.append(ToolCall(name=call.function.name, arguments=arguments, id=call.id))
    return Action(text=message.content or "", tool_calls=calls)


def make_openai_agent(*, max_turns: int = 8, model: str = "policy") -> AgentFn:
    """An OpenAI-client agent with at most ``max_turns`` model calls (``task.metadata["max_turns"]`` overrides)."""

    async def run_episode(ctx: EpisodeContext, task: Task) -> Trajectory | None:
        env: Environment | None = ctx.env
        if env is None:
            raise ConfigError(f"openai agent: task {task.id} names no environment (task.env)")
        return await converse(ctx, env, task, client_for(ctx))

    clients: WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncOpenAI] = WeakKeyDictionary()

    def client_for(ctx: EpisodeContext) -> AsyncOpenAI:
        """One client (one connection pool) per event loop, pointed at each episode's endpoint: building a client
        loads a CA bundle (~40 ms of CPU), more than all of an episode's calls through the proxy cost."""
        loop = asyncio.get_running_loop()
        if loop not in clients:
            clients[loop] = AsyncOpenAI(base_url=ctx.openai_base_url, api_key=ctx.openai_api_key)
        return clients[loop].with_options(base_url=ctx.openai_base_url, api_key=ctx.openai_api_key)

    async def converse(ctx: EpisodeContext, env: Environment, task: Task, client: AsyncOpenAI) -> Trajectory:
        obs = await env.reset(task)
        messages: list[Any] = [msgspec.to_builtins(m) for m in [*(task.prompt or []), *obs.messages]]
        tools: Any = obs.tools or omit  # a prompt without a tool schema (the quickstart's) sends none
        reward = 0.0
        for _ in range(int(task.metadata.get("max_turns", max_turns))):
            response = await client.chat.completions.create(model=model, messages=messages, tools=tools)
            choice = response.choices[0]
            messages.append(choice.message.model_dump(exclude_none=True))
            if choice.finish_reason == "length":
                return ctx.finish(reward=reward, status="truncated")
            result = await env.step(_action(choice.message))
            reward += result.reward
            if result.done:
                return ctx.finish(reward=reward, metadata=result.info)
            messages.extend(msgspec.to_builtins(m) for m in result.observation.messages)
        return ctx.finish(reward=reward, status="truncated", metadata={"end_reason": f"max_turns={max_turns}"})

    return run_episode


run_episode = make_openai_agent()
