"""Recording-proxy overhead: an agent written with the ``openai`` client against the native tool agent.

Both run the same multi-turn tool episodes on one event loop against the in-process fake engine of
``bench/agent_loop.py`` (a canned 32-token tool call returned at once), so what differs is only what the proxy
adds per model call: the OpenAI client building the request, HTTP over loopback to the worker's aiohttp app,
JSON both ways, matching the resent history against the recording, and parsing the reply's tool calls.

    python bench/proxy_overhead.py [--episodes 300] [--turns 4] [--concurrency 64]

Prints µs per model call and episodes/s for each path and the proxy / native ratio, measured in the same run.
A third path posts the same requests with a bare aiohttp client (no OpenAI SDK), which separates what the proxy
costs from what the ``openai`` client costs on the same event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from agent_loop import CountingEnv, FakeEngine, _task

from agentrl.agent import ChatRenderer, EpisodeContext, run_episode
from agentrl.agent.tools import parse_action
from agentrl.engine.tiny import train_tokenizer
from agentrl.env import LocalEnvs
from agentrl.messages import Task, Trajectory
from agentrl.proxy import OpenAIProxy
from agents.openai_agent import make_openai_agent
from agents.tool_agent import make_tool_agent


async def episodes(agent: Any, engine: FakeEngine, chat: ChatRenderer, n: int, turns: int, concurrency: int) -> float:
    envs = LocalEnvs({"calc": lambda: CountingEnv(turns)})
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with gate:
            outcome = await run_episode(agent, _task(i), generator=engine, chat=chat, envs=envs)
            assert outcome.trajectory.status == "completed", outcome.trajectory.turns[-1]

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return time.perf_counter() - t0


def bare_http_agent(session: aiohttp.ClientSession, turns: int) -> Any:
    """The openai agent's loop with plain JSON over aiohttp instead of the OpenAI SDK."""

    async def run(ctx: EpisodeContext, task: Task) -> Trajectory | None:
        assert ctx.env is not None
        obs = await ctx.env.reset(task)
        messages: list[Any] = [msgspec.to_builtins(m) for m in task.prompt or []]
        headers = {"Authorization": f"Bearer {ctx.openai_api_key}"}
        for _ in range(turns + 1):
            body = {"model": "policy", "messages": messages, "tools": obs.tools}
            async with session.post(f"{ctx.openai_base_url}/chat/completions", json=body, headers=headers) as resp:
                message = (await resp.json())["choices"][0]["message"]
            messages.append(message)
            result = await ctx.env.step(parse_action(message.get("content") or ""))  # the env only counts steps
            if result.done:
                return ctx.finish(reward=result.reward)
            messages.extend(msgspec.to_builtins(m) for m in result.observation.messages)
        return ctx.finish(status="truncated")

    return run


async def main(args: argparse.Namespace) -> None:
    chat = ChatRenderer(train_tokenizer(512))
    native = make_tool_agent(max_turns=args.turns + 1, max_context=1_000_000, stop_on_length=False)
    async with OpenAIProxy() as proxy, aiohttp.ClientSession() as session:
        served = proxy.wrap(make_openai_agent(max_turns=args.turns + 1))
        bare = proxy.wrap(bare_http_agent(session, args.turns))
        rows = []
        paths = (("native tool agent (ctx.generate)", native), ("openai client via the proxy", served),
                 ("bare aiohttp client via the proxy", bare))
        for name, agent in paths:
            engine = FakeEngine(chat.tokenizer)
            await episodes(agent, engine, chat, min(20, args.episodes), args.turns, args.concurrency)  # warm up
            engine.calls = 0
            seconds = await episodes(agent, engine, chat, args.episodes, args.turns, args.concurrency)
            rows.append((name, seconds, engine.calls))
    print(f"{args.episodes} episodes x {args.turns} model calls, {args.concurrency} concurrent on one uvloop loop")
    print(f"{'path':<36} {'µs/call':>9} {'episodes/s':>11} {'calls/s':>9}")
    for name, seconds, calls in rows:
        print(f"{name:<36} {1e6 * seconds / calls:>9.0f} {args.episodes / seconds:>11.1f} {calls / seconds:>9.0f}")
    (_, native_s, _), (_, sdk_s, calls), (_, bare_s, _) = rows
    print(f"openai client via the proxy / native: {sdk_s / native_s:.2f}x "
          f"(+{1e6 * (sdk_s - native_s) / calls:.0f} µs per call); bare HTTP via the proxy / native: "
          f"{bare_s / native_s:.2f}x (+{1e6 * (bare_s - native_s) / calls:.0f} µs per call: the proxy's own share)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--episodes", type=int, default=300)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=64)
    uvloop.run(main(p.parse_args()))
