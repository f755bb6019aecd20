"""End to end with real processes: nats-server, an `agentrl engine` serving a tiny model, an `agentrl envd`,
and the agent worker. The trajectory's model tokens must be exactly the engine's output ids, turn by turn."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agentrl.agent import ChatRenderer
from agentrl.bus import Bus
from agentrl.client import EngineClient
from agentrl.config.worker import WorkerConfig
from agentrl.env.remote import RemoteEnvs
from agentrl.generation import GenerateOutput
from agentrl.messages import ChatMessage, SamplingParams, Task, Trajectory
from agentrl.worker import AgentWorker
from agents import tool_agent

pytestmark = pytest.mark.slow


class Recording:
    """Delegates to the engine client and keeps every (input_ids, output) pair."""

    def __init__(self, inner: EngineClient) -> None:
        self.inner = inner
        self.calls: list[tuple[list[int], GenerateOutput]] = []
        self.started = asyncio.Event()

    async def generate(self, input_ids: Sequence[int] | np.ndarray, sampling: SamplingParams, *,
                       rid: str | None = None, session_id: str | None = None) -> GenerateOutput:
        self.started.set()
        out = await self.inner.generate(input_ids, sampling, rid=rid, session_id=session_id)
        self.calls.append((list(map(int, input_ids)), out))
        return out

    async def abort(self, rid: str) -> None:
        await self.inner.abort(rid)


async def _start_envd(nats_url: str, run: str) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agentrl.cli", "envd", "--nats", nats_url, "--run", run,
        "--env", "echo=tests.fixtures.envs:EchoEnv", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    async with asyncio.timeout(60):
        while b"ready" not in (line := await proc.stdout.readline()):
            assert line, "envd exited before it was ready"
    return proc


@pytest.mark.parametrize("max_new_tokens", [12, 3])
async def test_multi_turn_tool_episode_matches_engine_output_ids(
    bus: Bus, nats_url: str, run_name: str, engine_url: str, tiny_model_dir: Path, max_new_tokens: int
) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    envd = await _start_envd(nats_url, run_name)
    try:
        async with EngineClient(engine_url) as client:
            gen = Recording(client)
            worker = AgentWorker(
                bus, agent=tool_agent.make_tool_agent(stop_on_length=False), generator=gen, chat=ChatRenderer(tok),
                config=WorkerConfig(poll_timeout_s=0.2), envs=RemoteEnvs(bus.nc, bus.subjects, ["echo"]),
                worker_id="w-engine",
            )
            task = Task(id="e2e", group_id="g", prompt=[ChatMessage(role="user", content="Compute 3 + 4.")],
                        env="echo", env_args={"steps": 3},
                        # A random model rarely emits EOS: stop on 10% of token ids, so turns end by "stop" or
                        # "length" (both must stay aligned).
                        sampling=SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, sampling_seed=1,
                                                stop_token_ids=list(range(5, len(tok), 10))))
            await bus.publish(bus.subjects.task("new"), task, msg_id=task.id)
            running = asyncio.create_task(worker.run())
            consumer = await bus.consumer(bus.subjects.traj, durable="e2e-reader", typ=Trajectory)
            async with asyncio.timeout(120):
                while not (found := await consumer.fetch(batch=1, timeout=1.0)):
                    pass
            await found[0].ack()
            await consumer.unsubscribe()
            worker.stop()
            await asyncio.wait_for(running, 30)
    finally:
        envd.terminate()
        await envd.wait()
    t = found[0].msg
    assert (t.id, t.status, t.reward) == ("e2e-0", "completed", 1.0)
    assert len(gen.calls) == 3 and [turn.kind for turn in t.turns] == ["prompt", "model", "tool", "model", "tool", "model"]
    model_turns = [turn for turn in t.turns if turn.kind == "model"]
    stops = set(range(5, len(tok), 10))
    for turn in model_turns[:-1]:
        after = tok.decode(t.tokens[turn.end : turn.end + 2].tolist(), skip_special_tokens=False)
        if turn.finish_reason == "length":  # the end-of-turn text the model never wrote is appended, masked
            assert len(t.tokens[turn.start : turn.end]) == max_new_tokens and after.startswith("<|im_end|>")
        else:
            assert turn.finish_reason == "stop" and int(t.tokens[turn.end - 1]) in stops
            assert not after.startswith("<|im_end|>")
    for turn, (inputs, out) in zip(model_turns, gen.calls, strict=True):
        assert t.tokens[: turn.start].tolist() == inputs  # what the engine consumed is the trajectory's prefix
        assert t.tokens[turn.start : turn.end].tolist() == out.output_ids.tolist()  # and what it produced
        np.testing.assert_array_equal(t.logprobs[turn.start : turn.end], out.logprobs)
        assert t.versions[turn.start : turn.end].tolist() == out.versions.tolist()
        assert (t.loss_mask[turn.start : turn.end] == 1).all()
    assert int(t.loss_mask.sum()) == sum(len(out.output_ids) for _, out in gen.calls)
    assert (t.versions[t.loss_mask == 0] == -1).all() and (t.logprobs[t.loss_mask == 0] == 0).all()
    assert t.engine_id and np.all(t.logprobs[t.loss_mask == 1] <= 0)


async def test_abort_on_a_real_engine_resumes_token_for_token(
    bus: Bus, engine_url: str, tiny_model_dir: Path
) -> None:
    from transformers import AutoTokenizer

    from agentrl.env import LocalEnvs
    from agentrl.messages import AbortRequest
    from tests.fixtures.envs import EchoEnv

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    async with EngineClient(engine_url) as client:
        gen = Recording(client)
        worker = AgentWorker(
            bus, agent=tool_agent.make_tool_agent(stop_on_length=False), generator=gen, chat=ChatRenderer(tok),
            config=WorkerConfig(poll_timeout_s=0.2), envs=LocalEnvs({"echo": EchoEnv}), worker_id="w-abort",
        )
        task = Task(id="ab", group_id="g", prompt=[ChatMessage(role="user", content="Count.")], env="echo",
                    env_args={"steps": 2},
                    sampling=SamplingParams(max_new_tokens=600, ignore_eos=True, temperature=1.0))
        await bus.publish(bus.subjects.task("new"), task, msg_id=task.id)
        running = asyncio.create_task(worker.run())
        await asyncio.wait_for(gen.started.wait(), 60)
        await asyncio.sleep(0.2)  # mid-generation of the first turn
        await bus.broadcast("abort", AbortRequest(task_ids=["ab"]))
        consumer = await bus.consumer(bus.subjects.traj, durable="abort-reader", typ=Trajectory)
        found: list[Any] = []
        async with asyncio.timeout(120):
            while not any(d.msg.status != "aborted" for d in found):  # the aborted attempt comes first
                found += await consumer.fetch(batch=1, timeout=1.0)
        await consumer.unsubscribe()
        worker.stop()
        await asyncio.wait_for(running, 30)
    assert [d.msg.status for d in found] == ["aborted", "completed"]
    t = found[-1].msg
    assert (t.id, t.status, worker.stats.resumed_here) == ("ab-1", "completed", 1)
    (in0, cut), (in1, rest) = gen.calls[0], gen.calls[1]
    assert cut.finish_reason == "abort" and len(cut.output_ids) < 600
    assert in1 == in0 + cut.output_ids.tolist()  # the engine continued exactly where it was cut
    first = next(turn for turn in t.turns if turn.kind == "model")
    assert first.end - first.start == 600  # one assistant turn, the token budget kept across the resume
    assert t.tokens[first.start : first.end].tolist() == cut.output_ids.tolist() + rest.output_ids.tolist()
    np.testing.assert_array_equal(t.logprobs[first.start : first.end], np.concatenate([cut.logprobs, rest.logprobs]))
