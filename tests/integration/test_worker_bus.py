"""The agent worker against a real nats-server: throughput, failures, aborts, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from agentrl.agent import ChatRenderer, EpisodeContext
from agentrl.bus import Bus
from agentrl.config.worker import WorkerConfig
from agentrl.env import LocalEnvs
from agentrl.generation import GenerateOutput
from agentrl.messages import AbortRequest, ChatMessage, SamplingParams, Task, Trajectory
from agentrl.worker import AgentWorker
from agents import tool_agent
from envs.calculator import CalculatorEnv
from tests.fixtures.envs import ScriptedGenerator

CALL = '<tool_call>{"name": "calculator", "arguments": {"expression": "12*(3+4)"}}</tool_call>'


def _task(i: int, **kw: Any) -> Task:
    return Task(id=f"task{i}", group_id=f"g{i // 4}", group_size=4, index_in_group=i % 4,
                prompt=[ChatMessage(role="user", content="12*(3+4)?")], env="calculator", label="84",
                sampling=SamplingParams(max_new_tokens=64), **kw)


def _two_turns(i: int) -> str:
    return CALL if i % 2 == 0 else "\\boxed{84}"


async def exploding_agent(ctx: EpisodeContext, task: Task) -> Trajectory | None:
    if task.metadata.get("explode"):
        raise ZeroDivisionError("agent bug")
    return await tool_agent.run_episode(ctx, task)


@contextlib.asynccontextmanager
async def running_worker(bus: Bus, gen: Any, tok: Any, agent: Any = tool_agent.run_episode,
                         **cfg: Any) -> AsyncIterator[AgentWorker]:
    config = WorkerConfig(**{"poll_timeout_s": 0.2, "abort_grace_s": 2.0, **cfg})
    worker = AgentWorker(bus, agent=agent, generator=gen, chat=ChatRenderer(tok), config=config,
                         envs=LocalEnvs({"calculator": CalculatorEnv}), worker_id="w-test")
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)


async def _collect(bus: Bus, n: int, timeout: float = 60.0) -> dict[str, Trajectory]:
    consumer = await bus.consumer(bus.subjects.traj, durable="test-reader", typ=Trajectory)
    got: dict[str, Trajectory] = {}
    try:
        async with asyncio.timeout(timeout):
            while len(got) < n:
                for d in await consumer.fetch(batch=256, timeout=0.5):
                    got[d.msg.id] = d.msg
                    await d.ack()
    finally:
        await consumer.unsubscribe()
    return got


async def _eventually(condition: Any, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while True:
            if condition():
                return
            await asyncio.sleep(0.02)


async def _pending(bus: Bus, priority: str) -> int:
    info = await bus.js.consumer_info(bus.subjects.tasks_stream, f"workers-{priority}")
    return int(info.num_pending + info.num_ack_pending)


class ToolThenAnswer(ScriptedGenerator):
    """First turn of an episode (input = the prompt): a calculator call; later turns: the answer.
    Each call takes ``delay`` seconds, so episodes overlap; records the peak number of calls in flight."""

    def __init__(self, tok: Any, delay: float = 0.05) -> None:
        super().__init__(tok, lambda i: CALL if self._first[i] else "\\boxed{84}")
        self.delay = delay
        self._first: list[bool] = []
        self.in_flight = self.peak = 0

    async def generate(self, input_ids: Any, sampling: SamplingParams, **kw: Any) -> GenerateOutput:
        self._first.append("<tool_response>" not in self.tokenizer.decode(list(input_ids)))
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
            return await super().generate(input_ids, sampling, **kw)
        finally:
            self.in_flight -= 1


@pytest.mark.slow
async def test_200_concurrent_episodes_complete(bus: Bus, tiny_tokenizer: Any) -> None:
    gen = ToolThenAnswer(tiny_tokenizer)
    tasks = [_task(i) for i in range(200)]
    await bus.publish_many(bus.subjects.task("new"), tasks, msg_ids=[t.id for t in tasks])
    async with running_worker(bus, gen, tiny_tokenizer, concurrency=200):
        got = await _collect(bus, 200)
    assert len(got) == 200 and len(gen.calls) == 400 and gen.peak >= 150  # really concurrent
    assert all(t.status == "completed" and t.reward == 1.0 and t.worker_id == "w-test" for t in got.values())
    assert {t.task_id for t in got.values()} == {t.id for t in tasks}
    assert await _pending(bus, "new") == 0  # every task acked


async def test_resume_task_starts_promptly_while_the_worker_waits_for_new_tasks(bus: Bus, tiny_tokenizer: Any) -> None:
    gen = ToolThenAnswer(tiny_tokenizer)
    default_poll = WorkerConfig().poll_timeout_s
    latencies = []
    async with running_worker(bus, gen, tiny_tokenizer, poll_timeout_s=default_poll):
        for i in range(5):
            await asyncio.sleep(0.3)  # idle: the worker is in a pull for new tasks
            calls, sent = len(gen.calls), asyncio.get_running_loop().time()
            await bus.publish(bus.subjects.task("resume"), _task(i), msg_id=f"r{i}")
            await _eventually(lambda calls=calls: len(gen.calls) > calls)  # type: ignore[misc]
            latencies.append(asyncio.get_running_loop().time() - sent)
    # an aborted episode must not wait out a long pull for new tasks (with a 1 s pull this fails ~97%)
    assert max(latencies) < 0.5, latencies


async def test_agent_exception_fails_that_episode_and_worker_continues(bus: Bus, tiny_tokenizer: Any) -> None:
    gen = ScriptedGenerator(tiny_tokenizer, lambda i: "\\boxed{84}")
    tasks = [_task(i, metadata={"explode": i % 2 == 0}) for i in range(6)]
    await bus.publish_many(bus.subjects.task("new"), tasks, msg_ids=[t.id for t in tasks])
    async with running_worker(bus, gen, tiny_tokenizer, agent=exploding_agent, concurrency=4) as worker:
        got = await _collect(bus, 6)
    failed = [t for t in got.values() if t.status == "failed"]
    assert len(failed) == 3 and worker.stats.failed == 3
    assert all("ZeroDivisionError: agent bug" in t.turns[-1].text and "Traceback" in t.turns[-1].text
               for t in failed)
    assert sorted(t.status for t in got.values()).count("completed") == 3


class HoldingGenerator(ScriptedGenerator):
    """For its first ``hold_calls`` calls: waits until aborted, then returns 2 tokens with finish 'abort'."""

    def __init__(self, *a: Any, hold_calls: int = 1_000_000, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.hold_calls = hold_calls
        self.waiting: dict[str, asyncio.Event] = {}
        self.entered = asyncio.Event()

    async def generate(self, input_ids: Any, sampling: SamplingParams, *, rid: str | None = None,
                       **kw: Any) -> GenerateOutput:
        out = await super().generate(input_ids, sampling, rid=rid, **kw)
        if len(self.calls) > self.hold_calls:
            return out
        gate = self.waiting[rid or ""] = asyncio.Event()
        self.entered.set()
        await gate.wait()
        cut = GenerateOutput(output_ids=out.output_ids[:2], logprobs=out.logprobs[:2], versions=out.versions[:2],
                             finish_reason="abort", rid=rid or "")
        self.outputs[-1] = cut
        return cut

    async def abort(self, rid: str) -> None:
        await super().abort(rid)
        self.waiting[rid].set()


async def test_abort_publishes_the_attempt_and_resumes_it_here_token_for_token(bus: Bus, tiny_tokenizer: Any) -> None:
    rest = tiny_tokenizer.decode(tiny_tokenizer.encode("\\boxed{84}", add_special_tokens=False)[2:])
    holder = HoldingGenerator(tiny_tokenizer, lambda i: "\\boxed{84}" if i == 0 else rest, version=1, hold_calls=1)
    await bus.publish(bus.subjects.task("new"), _task(0), msg_id="task0")
    async with running_worker(bus, holder, tiny_tokenizer) as worker:
        await asyncio.wait_for(holder.entered.wait(), 10)
        holder.version = 2  # new weights arrive while the episode is out
        await bus.broadcast("abort", AbortRequest(task_ids=["task0"]))
        got = await _collect(bus, 2)  # the aborted attempt, then the episode resumed on this worker
    assert (worker.stats.resumed_here, worker.stats.requeued, worker.stats.published) == (1, 0, 2)
    aborted = got["task0-0"]
    assert aborted.status == "aborted" and aborted.turns[-1].kind == "abort"  # visible, never trained
    assert holder.aborted == ["task0-0-0"]
    assert await _pending(bus, "new") == 0 and await _pending(bus, "resume") == 0
    t = got["task0-1"]
    assert (t.status, t.reward, t.attempt) == ("completed", 1.0, 1)
    first = holder.outputs[0].output_ids[:2].tolist()
    prompt = holder.calls[0].tolist()
    assert holder.calls[1].tolist() == prompt + first  # resumed token for token, not re-tokenized
    trained = t.loss_mask == 1
    assert t.tokens[trained].tolist() == first + holder.outputs[1].output_ids.tolist()
    assert t.versions[trained].tolist() == [1, 1] + [2] * len(holder.outputs[1].output_ids)
    assert t.turns[-1].text == "\\boxed{84}"  # the resumed turn is one assistant message
    np.testing.assert_array_equal(t.tokens[: len(prompt)], prompt)


async def test_shutdown_requeues_in_flight_episodes(bus: Bus, tiny_tokenizer: Any) -> None:
    holder = HoldingGenerator(tiny_tokenizer, lambda i: "\\boxed{84}")
    tasks = [_task(i) for i in range(3)]
    await bus.publish_many(bus.subjects.task("new"), tasks, msg_ids=[t.id for t in tasks])
    async with running_worker(bus, holder, tiny_tokenizer) as worker:
        await _eventually(lambda: len(holder.waiting) == 3)
    assert worker.stats.requeued == 3 and worker.stats.published == 3  # the aborted attempts are published
    assert await _pending(bus, "new") == 0 and await _pending(bus, "resume") == 3
    resume = await bus.consumer(bus.subjects.task("resume"), durable="workers-resume", typ=Task)
    got = [d.msg for d in await resume.fetch(batch=10, timeout=10)]
    await resume.unsubscribe()
    assert sorted(t.id for t in got) == ["task0", "task1", "task2"]
    assert all(t.attempt == 1 and t.partial is not None and int(t.partial.loss_mask.sum()) == 2 for t in got)
    # the calculator can be snapshotted: its state travels with the partial to whichever worker resumes it
    assert all(t.partial is not None and t.partial.env is not None and t.partial.env.mode == "snapshot" for t in got)
