"""The recording proxy against real processes: nats-server, an ``agentrl engine`` serving a tiny model, and the
agent worker running an agent written with the plain ``openai`` client. What the trajectory trains on must be
exactly what the engine produced, call by call; an abort in the middle of a call resumes token for token."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest

from agentrl.agent import ChatRenderer, EpisodeContext
from agentrl.bus import Bus
from agentrl.client import EngineClient
from agentrl.config.worker import WorkerConfig
from agentrl.messages import AbortRequest, ChatMessage, SamplingParams, Task, Trajectory
from agentrl.proxy import OpenAIProxy
from agentrl.worker import AgentWorker
from tests.integration.test_worker_engine import Recording

pytestmark = pytest.mark.slow

FOLLOW_UPS = ["Again.", "Once more."]


def _agent(replies: list[Any]) -> Any:
    """Three chat calls, a user follow-up after each reply; every response is kept in ``replies``."""

    async def chatty(ctx: EpisodeContext, task: Task) -> Trajectory | None:
        client = openai.AsyncOpenAI(base_url=ctx.openai_base_url, api_key=ctx.openai_api_key, max_retries=0)
        messages: list[Any] = [{"role": "user", "content": "Count."}]
        for i, follow_up in enumerate([*FOLLOW_UPS, None]):
            limit = openai.omit if i == 0 else 8  # the follow-ups are short
            response = await client.chat.completions.create(model="policy", messages=messages, logprobs=True,
                                                            max_tokens=limit)
            replies.append(response)
            messages.append(response.choices[0].message.model_dump(exclude_none=True))
            if follow_up is None:
                return ctx.finish(reward=1.0)
            messages.append({"role": "user", "content": follow_up})
        raise AssertionError("unreachable")

    return chatty


async def _first_trajectory(bus: Bus, durable: str, done: Any) -> list[Trajectory]:
    consumer = await bus.consumer(bus.subjects.traj, durable=durable, typ=Trajectory)
    found: list[Trajectory] = []
    async with asyncio.timeout(120):
        while not done(found):
            for d in await consumer.fetch(batch=1, timeout=1.0):
                await d.ack()
                found.append(d.msg)
    await consumer.unsubscribe()
    return found


@pytest.fixture
async def proxy() -> AsyncIterator[OpenAIProxy]:
    async with OpenAIProxy() as p:
        yield p


def _worker(bus: Bus, proxy: OpenAIProxy, agent: Any, gen: Recording, tok: Any) -> AgentWorker:
    return AgentWorker(bus, agent=proxy.wrap(agent), generator=gen, chat=ChatRenderer(tok),
                       config=WorkerConfig(poll_timeout_s=0.2), worker_id="w-proxy")


async def test_trajectory_holds_exactly_the_engine_tokens_of_every_call(
        bus: Bus, engine_url: str, tiny_model_dir: Path, proxy: OpenAIProxy) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    replies: list[Any] = []
    async with EngineClient(engine_url) as client:
        gen = Recording(client)
        worker = _worker(bus, proxy, _agent(replies), gen, tok)
        task = Task(id="px", group_id="g", prompt=[ChatMessage(role="user", content="Count.")],
                    sampling=SamplingParams(max_new_tokens=10, temperature=1.0, stop_token_ids=list(range(5, 400, 10))))
        await bus.publish(bus.subjects.task("new"), task, msg_id=task.id)
        running = asyncio.create_task(worker.run())
        (t,) = await _first_trajectory(bus, "proxy-reader", lambda found: found)
        worker.stop()
        await asyncio.wait_for(running, 30)
    assert (t.id, t.status, t.reward) == ("px-0", "completed", 1.0)
    assert [turn.kind for turn in t.turns] == ["prompt", "model", "env", "model", "env", "model"]
    model_turns = [turn for turn in t.turns if turn.kind == "model"]
    for turn, (inputs, out), reply in zip(model_turns, gen.calls, replies, strict=True):
        assert t.tokens[: turn.start].tolist() == inputs  # what the engine consumed is the trajectory's prefix
        assert t.tokens[turn.start: turn.end].tolist() == out.output_ids.tolist()  # and what it produced
        np.testing.assert_array_equal(t.logprobs[turn.start: turn.end], out.logprobs)
        assert t.versions[turn.start: turn.end].tolist() == out.versions.tolist()
        sent = [entry.logprob for entry in reply.choices[0].logprobs.content]
        np.testing.assert_allclose(sent, out.logprobs, rtol=1e-6)  # the client saw the engine's logprobs too
        assert (reply.choices[0].model_extra or {})["token_ids"] == out.output_ids.tolist()
    assert int(t.loss_mask.sum()) == sum(len(out.output_ids) for _, out in gen.calls)
    # the follow-ups were rendered alone and appended, masked: the text is the template's whole conversation
    text = tok.decode(t.tokens.tolist(), skip_special_tokens=False)
    assert all(f"<|im_start|>user\n{f}<|im_end|>\n<|im_start|>assistant\n" in text for f in FOLLOW_UPS)


async def test_abort_in_the_middle_of_a_call_resumes_token_for_token(
        bus: Bus, engine_url: str, tiny_model_dir: Path, proxy: OpenAIProxy) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    replies: list[Any] = []
    async with EngineClient(engine_url) as client:
        gen = Recording(client)
        worker = _worker(bus, proxy, _agent(replies), gen, tok)
        task = Task(id="pab", group_id="g", prompt=[ChatMessage(role="user", content="Count.")],
                    sampling=SamplingParams(max_new_tokens=600, ignore_eos=True, temperature=1.0))
        await bus.publish(bus.subjects.task("new"), task, msg_id=task.id)
        running = asyncio.create_task(worker.run())
        await asyncio.wait_for(gen.started.wait(), 60)
        await asyncio.sleep(0.2)  # in the middle of the first call
        await bus.broadcast("abort", AbortRequest(task_ids=["pab"]))
        found = await _first_trajectory(bus, "proxy-abort-reader", lambda f: any(t.status != "aborted" for t in f))
        worker.stop()
        await asyncio.wait_for(running, 30)
    assert [t.status for t in found] == ["aborted", "completed"]
    t = found[-1]
    assert (t.id, worker.stats.resumed_here) == ("pab-1", 1)
    (in0, cut), (in1, rest) = gen.calls[0], gen.calls[1]
    assert cut.finish_reason == "abort" and 0 < len(cut.output_ids) < 600
    assert in1 == in0 + cut.output_ids.tolist()  # the engine continued exactly where it was cut
    first = next(turn for turn in t.turns if turn.kind == "model")
    assert first.end - first.start == 600  # one reply, its token budget kept across the resume
    assert t.tokens[first.start: first.end].tolist() == cut.output_ids.tolist() + rest.output_ids.tolist()
    np.testing.assert_array_equal(t.logprobs[first.start: first.end], np.concatenate([cut.logprobs, rest.logprobs]))
    # the client got the whole reply once, from the resumed run: the aborted call never answered
    assert len(replies) == 3
    assert (replies[0].choices[0].model_extra or {})["token_ids"] == cut.output_ids.tolist() + rest.output_ids.tolist()
    assert len(gen.calls) == 4  # the cut call, its continuation, and the two follow-ups
