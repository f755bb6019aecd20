"""Agent-loop overhead: what the SDK adds per model call, and episodes/s on one event loop.

A fast fake engine (an in-process Generator returning a canned 32-token response at once)
isolates the SDK's own cost. Three ways to run the same multi-turn tool episodes:

* ``direct``   — the bare engine call (``await gen.generate(...)``) in a loop: the floor;
* ``by hand``  — a hand-written loop a user could write without the SDK: keep a Python list of
  tokens, call the engine, append pre-tokenized observations (no chat template, no masks, no
  logprobs/versions bookkeeping, no trajectory);
* ``sdk``      — ``agents.tool_agent`` through ``run_episode``: chat-template rendering of each
  observation, tool-call parsing, the env step, aligned trajectory arrays, turn log, a Trajectory.

Per-call SDK overhead = (sdk − direct) / model calls, per-episode setup (prompt rendering with the
tool schemas, env open/close, the Trajectory) included; the marginal cost of one more turn is
measured from episodes twice as long. Then many episodes run concurrently on one uvloop loop to
report episodes/s and model calls/s.

    python bench/agent_loop.py [--episodes 2000] [--turns 4] [--concurrency 256]
    python bench/agent_loop.py --real-engine --episodes 40   # same paths against a real `agentrl engine`

With ``--real-engine`` a tiny random model is served by an ``agentrl engine`` subprocess over HTTP
(16 tokens per response, ``ignore_eos``); the SDK's overhead is then compared with the hand-written
loop, which sends the engine exactly the same token sequences.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agentrl.agent import ChatRenderer, run_episode
from agentrl.agent.tools import tool_message
from agentrl.engine.tiny import train_tokenizer
from agentrl.env import LocalEnvs, Observation, StepResult
from agentrl.generation import GenerateOutput
from agentrl.messages import ChatMessage, SamplingParams, Task
from agents.tool_agent import make_tool_agent

REPLY = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "12 * (3 + 4) - 5"}}\n</tool_call>'


class FakeEngine:
    """Returns the same canned response immediately (one await point, like an HTTP call)."""

    def __init__(self, tok: Any) -> None:
        ids = [*tok.encode(REPLY, add_special_tokens=False), tok.convert_tokens_to_ids("<|im_end|>")]
        self.out_ids = np.asarray(ids, dtype=np.int32)
        self.logprobs = np.full(len(ids), -0.5, dtype=np.float32)
        self.versions = np.zeros(len(ids), dtype=np.int32)
        self.calls = 0

    async def generate(self, input_ids: Sequence[int] | np.ndarray, sampling: SamplingParams, *,
                       rid: str | None = None, session_id: str | None = None) -> GenerateOutput:
        self.calls += 1
        await asyncio.sleep(0)
        return GenerateOutput(output_ids=self.out_ids, logprobs=self.logprobs, versions=self.versions,
                              finish_reason="stop", rid=rid or "")


class CountingEnv:
    """Answers ``steps - 1`` tool calls, then ends with reward 1."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.n = 0

    async def reset(self, task: Task) -> Observation:
        self.n = 0
        return Observation(tools=[{"type": "function", "function": {"name": "calculator"}}])

    async def step(self, action: Any) -> StepResult:
        self.n += 1
        if self.n >= self.steps:
            return StepResult(done=True, reward=1.0)
        return StepResult(observation=Observation(messages=[tool_message(f"{79 + self.n}")]))

    async def close(self) -> None:
        return None


def _task(i: int) -> Task:
    return Task(id=f"b{i}", group_id="g", prompt=[ChatMessage(role="user", content="What is 12*(3+4)-5?")],
                env="calc", label="79", sampling=SAMPLING)


async def direct(engine: Any, episodes: int, turns: int, prompt: list[int]) -> float:
    t0 = time.perf_counter()
    for _ in range(episodes * turns):
        await engine.generate(prompt, SAMPLING)
    return time.perf_counter() - t0


async def by_hand(engine: Any, episodes: int, turns: int, prompt: list[int], obs: list[int]) -> float:
    t0 = time.perf_counter()
    for _ in range(episodes):
        tokens = list(prompt)
        for _ in range(turns):
            out = await engine.generate(tokens, SAMPLING)
            tokens += out.output_ids.tolist()
            tokens += obs
    return time.perf_counter() - t0


SAMPLING = SamplingParams(max_new_tokens=64)


async def sdk(engine: Any, chat: ChatRenderer, episodes: int, turns: int, concurrency: int) -> float:
    agent = make_tool_agent(max_turns=turns + 1, max_context=1_000_000, stop_on_length=False)
    envs = LocalEnvs({"calc": lambda: CountingEnv(turns)})
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with gate:
            outcome = await run_episode(agent, _task(i), generator=engine, chat=chat, envs=envs)
            assert outcome.trajectory.status == "completed", outcome.trajectory.turns[-1]

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(episodes)))
    return time.perf_counter() - t0


async def main(args: argparse.Namespace, engine_url: str | None, model_dir: Path | None) -> None:
    global SAMPLING
    if engine_url is not None and model_dir is not None:
        from transformers import AutoTokenizer

        from agentrl.client import EngineClient

        tok = AutoTokenizer.from_pretrained(model_dir)
        SAMPLING = SamplingParams(max_new_tokens=16, ignore_eos=True, temperature=1.0)
        engine: Any = EngineClient(engine_url)
    else:
        tok = train_tokenizer(512)
        engine = FakeEngine(tok)
    chat = ChatRenderer(tok)
    prompt = chat.prompt_ids(_task(0).prompt or [], tools=[{"type": "function", "function": {"name": "calculator"}}])
    obs = chat.delta_ids([tool_message("80")], after_model_text="x<|im_end|>")
    n_warm = 5 if engine_url else 50
    await direct(engine, n_warm, args.turns, prompt)
    await sdk(engine, chat, n_warm, args.turns, 1)
    calls = args.episodes * args.turns
    t_direct = await direct(engine, args.episodes, args.turns, prompt)
    t_hand = await by_hand(engine, args.episodes, args.turns, prompt, obs)
    t_seq = await sdk(engine, chat, args.episodes, args.turns, 1)
    t_long = await sdk(engine, chat, args.episodes, 2 * args.turns, 1)
    t_conc = await sdk(engine, chat, args.episodes, args.turns, args.concurrency)
    us = 1e6 / calls
    if engine_url is not None:
        await engine.close()
    kind = "real agentrl engine over HTTP, 16-token" if engine_url else "in-process fake engine, 32-token"
    print(f"{args.episodes} episodes x {args.turns} model turns ({calls} calls), {kind} responses, "
          f"prompt {len(prompt)} tokens, observation {len(obs)} tokens; loop: {type(asyncio.get_running_loop())}")
    print("| path | µs per model call | episodes/s | model calls/s |")
    print("| --- | --- | --- | --- |")
    for name, t in [("direct engine call (floor)", t_direct), ("hand-written loop, no SDK", t_hand),
                    ("SDK, 1 episode at a time", t_seq), (f"SDK, {args.concurrency} concurrent", t_conc)]:
        print(f"| {name} | {t * us:.1f} | {args.episodes / t:,.0f} | {calls / t:,.0f} |")
    marginal = (t_long - t_seq) * us - t_direct * us  # one more turn: model call + tool step, minus the call
    if engine_url is None:  # against a real engine, call-time noise (ms) dwarfs this difference
        print(f"marginal SDK cost of one more turn (episodes of {2 * args.turns} vs {args.turns} turns, minus the "
          f"engine call): {marginal:.1f} µs")
    print(f"SDK overhead per model call: {(t_seq - t_direct) * us:.1f} µs vs the bare call, "
          f"{(t_seq - t_hand) * us:.1f} µs vs the hand-written loop (sequential; target well under 1000 µs); "
          f"SDK / direct = {t_seq / t_direct:.2f}x, SDK / hand-written = {t_seq / t_hand:.2f}x")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, default=2000)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--real-engine", action="store_true", help="serve a tiny random model with `agentrl engine`")
    args = p.parse_args()
    if not args.real_engine:
        uvloop.run(main(args, None, None))
    else:
        import tempfile

        from agentrl.engine.tiny import TinyModelSpec, init_model
        from tests.fixtures.engine import start_engine

        model_dir = init_model(Path(tempfile.mkdtemp()) / "model", TinyModelSpec())
        with start_engine(model_dir, "--max-running", str(args.concurrency)) as url:
            uvloop.run(main(args, url, model_dir))
