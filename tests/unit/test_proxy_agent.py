"""The openai-client agent through the recording proxy (real loopback HTTP, scripted generator): it records the
same tokens as the native tool agent, resumes an abort token for token, and ends as the runtime expects."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import numpy as np
import openai
import pytest

from agentrl.agent import ChatRenderer, EpisodeContext, run_episode
from agentrl.env import LocalEnvs
from agentrl.messages import ChatMessage, SamplingParams, Task, Trajectory
from agentrl.proxy import OpenAIProxy
from agents import openai_agent, tool_agent
from envs.calculator import CalculatorEnv
from tests.fixtures.envs import ScriptedGenerator
from tests.unit.test_agent_episode import AbortingGenerator

CALL = '<tool_call>{{"name": "calculator", "arguments": {{"expression": "{}"}}}}</tool_call>'
ENVS = LocalEnvs({"calculator": CalculatorEnv})
REPLIES = [CALL.format("12*(3+4)"), "Let me check. " + CALL.format("84/1"), "\\boxed{84}"]


@pytest.fixture
async def proxy() -> AsyncIterator[OpenAIProxy]:
    async with OpenAIProxy() as p:
        yield p


def _task(env: str = "calculator") -> Task:
    return Task(id="t1", group_id="g1", prompt=[ChatMessage(role="user", content="What is 12*(3+4)?")],
                env=env, label="84", sampling=SamplingParams(max_new_tokens=64))


async def _run(agent: Any, task: Task, gen: Any, tok: Any, **kw: Any) -> Any:
    return await run_episode(agent, task, generator=gen, chat=ChatRenderer(tok), envs=ENVS, **kw)


def _arrays(t: Trajectory) -> list[list[Any]]:
    return [t.tokens.tolist(), t.loss_mask.tolist(), t.logprobs.tolist(), t.versions.tolist()]


async def test_openai_agent_records_exactly_what_the_tool_agent_trains_on(proxy: OpenAIProxy,
                                                                         tiny_tokenizer: Any) -> None:
    native = await _run(tool_agent.run_episode, _task(), ScriptedGenerator(tiny_tokenizer, REPLIES), tiny_tokenizer)
    gen = ScriptedGenerator(tiny_tokenizer, REPLIES)
    served = await _run(proxy.wrap(openai_agent.run_episode), _task(), gen, tiny_tokenizer)
    t = served.trajectory
    assert (t.status, t.reward) == ("completed", 1.0), t.turns[-1].text
    assert _arrays(t) == _arrays(native.trajectory)  # same tokens, mask, logprobs, versions
    assert [x.kind for x in t.turns] == [x.kind for x in native.trajectory.turns]
    # append-only: each engine call's input is the previous input + output + the tool result's delta
    for k in range(1, 3):
        prev = np.concatenate([gen.calls[k - 1], gen.outputs[k - 1].output_ids])
        assert gen.calls[k][: len(prev)].tolist() == prev.tolist()


async def test_abort_mid_call_resumes_token_for_token_and_replays_earlier_replies(
        proxy: OpenAIProxy, tiny_tokenizer: Any) -> None:
    agent = proxy.wrap(openai_agent.run_episode)
    first = AbortingGenerator(tiny_tokenizer, REPLIES[:2], abort_at=1, keep=4, version=1)
    out = await _run(agent, _task(), first, tiny_tokenizer)
    assert out.trajectory.status == "aborted" and out.resume is not None and out.resume.partial is not None
    partial = out.resume.partial
    assert partial.tokens.tolist() == out.trajectory.tokens.tolist()
    assert partial.tokens[-4:].tolist() == first.outputs[1].output_ids.tolist()  # the cut reply is kept
    # Resumed: the agent runs again from its start; its first call is answered from the recording, the second
    # continues the cut reply where the engine stopped.
    rest = tiny_tokenizer.decode(tiny_tokenizer.encode(REPLIES[1], add_special_tokens=False)[4:])
    second = ScriptedGenerator(tiny_tokenizer, [rest, REPLIES[2]], version=2)
    done = await _run(agent, out.resume, second, tiny_tokenizer, env=out.env)
    t = done.trajectory
    assert (t.status, t.reward, t.id) == ("completed", 1.0, "t1-1"), t.turns[-1].text
    assert len(second.calls) == 2 and second.calls[0].tolist() == partial.tokens.tolist()
    n = len(partial.tokens)
    assert t.tokens[:n].tolist() == partial.tokens.tolist() and t.versions[:n].tolist() == partial.versions.tolist()
    cut = next(x for x in t.turns if x.kind == "model" and x.start < n < x.end)
    assert set(t.versions[cut.start:cut.end].tolist()) == {1, 2}  # one reply spanning two versions
    native = await _run(tool_agent.run_episode, _task(), ScriptedGenerator(tiny_tokenizer, REPLIES), tiny_tokenizer)
    assert t.tokens.tolist() == native.trajectory.tokens.tolist()


async def test_an_edited_history_is_refused_and_the_episode_fails(proxy: OpenAIProxy, tiny_tokenizer: Any) -> None:
    async def editing(ctx: EpisodeContext, task: Task) -> Trajectory | None:
        client = openai.AsyncOpenAI(base_url=ctx.openai_base_url, api_key=ctx.openai_api_key, max_retries=0)
        messages: list[Any] = [{"role": "user", "content": "What is 12*(3+4)?"}]
        reply = await client.chat.completions.create(model="m", messages=messages)
        messages = [{"role": "user", "content": "What is 12*(3+5)?"}, reply.choices[0].message.model_dump()]
        await client.chat.completions.create(model="m", messages=[*messages, {"role": "user", "content": "sure?"}])
        return ctx.finish(reward=1.0)

    out = await _run(proxy.wrap(editing), _task(), ScriptedGenerator(tiny_tokenizer, ["84", "yes"]), tiny_tokenizer)
    t = out.trajectory
    assert t.status == "failed" and out.infra is None
    assert "Error code: 400" in t.turns[-1].text and "messages[0] differs" in t.turns[-1].text, t.turns[-1].text[-700:]


async def test_context_budget_ends_the_episode_truncated(proxy: OpenAIProxy, tiny_tokenizer: Any) -> None:
    loop = ScriptedGenerator(tiny_tokenizer, lambda i: CALL.format(f"{i}+1"))
    agent = proxy.wrap(openai_agent.make_openai_agent(max_turns=50))
    out = await _run(agent, _task(), loop, tiny_tokenizer, max_context=300)
    assert out.trajectory.status == "truncated", out.trajectory.turns[-1].text


async def test_the_endpoint_needs_the_episode_key_and_ends_with_the_episode(proxy: OpenAIProxy,
                                                                           tiny_tokenizer: Any) -> None:
    seen: dict[str, Any] = {}

    async def probing(ctx: EpisodeContext, task: Task) -> Trajectory | None:
        url = f"{ctx.openai_base_url}/chat/completions"
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        async with aiohttp.ClientSession() as http:
            for key in ("", "wrong", ctx.openai_api_key):
                async with http.post(url, json=body, headers={"Authorization": f"Bearer {key}"}) as resp:
                    seen[key] = (resp.status, await resp.json())
        seen["url"] = url
        return ctx.finish()

    await _run(proxy.wrap(probing), _task(env=""), ScriptedGenerator(tiny_tokenizer, ["hello"]), tiny_tokenizer)
    assert seen[""][0] == seen["wrong"][0] == 401 and seen["wrong"][1]["error"]["code"] == "invalid_api_key"
    (status, ok), = [v for k, v in seen.items() if k not in ("", "wrong", "url")]
    assert status == 200 and ok["choices"][0]["message"]["content"] == "hello"
    async with aiohttp.ClientSession() as http, http.post(seen["url"], json={}) as resp:
        assert resp.status == 404  # the episode ended: its endpoint is gone


async def test_text_completions_extend_one_token_sequence(proxy: OpenAIProxy, tiny_tokenizer: Any) -> None:
    async def completing(ctx: EpisodeContext, task: Task) -> Trajectory | None:
        client = openai.AsyncOpenAI(base_url=ctx.openai_base_url, api_key=ctx.openai_api_key, max_retries=0)
        prompt = "Q: What is 12*(3+4)?\nA:"
        first = await client.completions.create(model="m", prompt=prompt, max_tokens=20, logprobs=1)
        prompt += first.choices[0].text + "\nQ: sure?\nA:"
        await client.completions.create(model="m", prompt=prompt, max_tokens=20)
        with pytest.raises(openai.BadRequestError, match="does not start with the"):
            await client.completions.create(model="m", prompt="Q: something else", max_tokens=20)
        return ctx.finish(reward=1.0)

    gen = ScriptedGenerator(tiny_tokenizer, [" 84", " yes"])
    out = await _run(proxy.wrap(completing), _task(env=""), gen, tiny_tokenizer)
    t = out.trajectory
    assert t.status == "completed", t.turns[-1].text
    assert [x.kind for x in t.turns] == ["prompt", "model", "env", "model"]
    segs = [(x.start, x.end) for x in t.turns if x.kind == "model"]
    assert [t.tokens[s:e].tolist() for s, e in segs] == [o.output_ids.tolist() for o in gen.outputs]
    assert gen.calls[1][: len(gen.calls[0])].tolist() == gen.calls[0].tolist()


async def test_openai_agent_contract(proxy: OpenAIProxy, tiny_tokenizer: Any) -> None:
    import inspect

    from agentrl.plugins import load_object

    agent = load_object("agents.openai_agent:run_episode", what="agent")
    assert inspect.iscoroutinefunction(agent) and list(inspect.signature(agent).parameters) == ["ctx", "task"]
    gen = ScriptedGenerator(tiny_tokenizer, ["\\boxed{84}"])
    t = (await _run(proxy.wrap(agent), _task(), gen, tiny_tokenizer)).trajectory
    assert (t.status, t.reward, t.id) == ("completed", 1.0, "t1-0")
    assert t.tokens[t.loss_mask == 1].tolist() == gen.outputs[0].output_ids.tolist()
    with pytest.raises(RuntimeError, match="no OpenAI endpoint"):  # run without the worker's proxy
        EpisodeContext(_task(), generator=gen, chat=ChatRenderer(tiny_tokenizer)).openai_base_url  # noqa: B018


async def test_streamed_chat_gets_the_same_reply(proxy: OpenAIProxy, tiny_tokenizer: Any) -> None:
    got: dict[str, Any] = {}

    async def streaming(ctx: EpisodeContext, task: Task) -> Trajectory | None:
        client = openai.AsyncOpenAI(base_url=ctx.openai_base_url, api_key=ctx.openai_api_key, max_retries=0)
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "What is 12*(3+4)?"}], stream=True)
        chunks = [chunk async for chunk in stream]
        got["content"] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        got["calls"] = [tc.function.name for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []
                        if tc.function]
        got["finish"] = chunks[-1].choices[0].finish_reason
        return ctx.finish()

    await _run(proxy.wrap(streaming), _task(env=""), ScriptedGenerator(tiny_tokenizer, [REPLIES[1]]), tiny_tokenizer)
    assert got == {"content": "Let me check.", "calls": ["calculator"], "finish": "tool_calls"}


async def test_an_engine_failure_is_retried_as_infrastructure(proxy: OpenAIProxy, tiny_tokenizer: Any) -> None:
    from agentrl.errors import NoHealthyEngine

    class Down(ScriptedGenerator):
        async def generate(self, *a: Any, **kw: Any) -> Any:
            raise NoHealthyEngine("every engine is down")

    out = await _run(proxy.wrap(openai_agent.run_episode), _task(), Down(tiny_tokenizer, []), tiny_tokenizer)
    assert out.trajectory.status == "failed" and out.infra is not None and "NoHealthyEngine" in out.infra


async def test_an_episode_cancelled_between_calls_keeps_the_reply_it_got(proxy: OpenAIProxy,
                                                                         tiny_tokenizer: Any) -> None:
    import asyncio

    answered = asyncio.Event()
    contexts: list[EpisodeContext] = []

    async def thinking(ctx: EpisodeContext, task: Task) -> Trajectory | None:
        client = openai.AsyncOpenAI(base_url=ctx.openai_base_url, api_key=ctx.openai_api_key, max_retries=0)
        reply = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi?"}])
        answered.set()
        if not ctx.resumed:
            await asyncio.sleep(30)  # e.g. a slow tool of the framework's own; the worker cancels it
        return ctx.finish(reward=1.0, metadata={"reply": reply.choices[0].message.content})

    gen = ScriptedGenerator(tiny_tokenizer, ["Hello there."])
    running = asyncio.create_task(_run(proxy.wrap(thinking), _task(env=""), gen, tiny_tokenizer,
                                       on_start=contexts.append))
    await asyncio.wait_for(answered.wait(), 10)
    contexts[0].request_abort()  # as the worker does after abort_grace_s
    running.cancel()
    out = await running
    assert out.trajectory.status == "aborted" and out.resume is not None and out.resume.partial is not None
    assert out.resume.partial.tokens[-len(gen.outputs[0].output_ids):].tolist() == gen.outputs[0].output_ids.tolist()
    done = await _run(proxy.wrap(thinking), out.resume, gen, tiny_tokenizer)
    assert done.trajectory.status == "completed" and done.trajectory.metadata["reply"] == "Hello there."
    assert len(gen.calls) == 1  # the resumed agent's call was answered from the recording


class CountingCalculator(CalculatorEnv):
    """The calculator, counting the steps it really takes (a stand-in for any environment with state)."""

    stepped: list[str] = []

    async def step(self, action: Any) -> Any:
        CountingCalculator.stepped.append(action.text)
        return await super().step(action)


async def test_a_resumed_agent_repeating_its_steps_gets_the_recorded_results(proxy: OpenAIProxy,
                                                                            tiny_tokenizer: Any) -> None:
    """The resumed openai agent runs again from its start: the step it already took is answered from the record,
    so the environment is stepped once per action over the whole episode (not once more per resume)."""
    envs = LocalEnvs({"calculator": CountingCalculator})
    agent = proxy.wrap(openai_agent.run_episode)
    CountingCalculator.stepped = []
    whole = await run_episode(agent, _task(), generator=ScriptedGenerator(tiny_tokenizer, REPLIES),
                              chat=ChatRenderer(tiny_tokenizer), envs=envs)
    assert whole.trajectory.reward == 1.0
    uninterrupted, CountingCalculator.stepped = CountingCalculator.stepped, []
    first = AbortingGenerator(tiny_tokenizer, REPLIES[:2], abort_at=1, keep=4, version=1)
    out = await run_episode(agent, _task(), generator=first, chat=ChatRenderer(tiny_tokenizer), envs=envs)
    assert out.resume is not None and len(CountingCalculator.stepped) == 1
    rest = tiny_tokenizer.decode(tiny_tokenizer.encode(REPLIES[1], add_special_tokens=False)[4:])
    second = ScriptedGenerator(tiny_tokenizer, [rest, REPLIES[2]], version=2)
    done = await run_episode(agent, out.resume, generator=second, chat=ChatRenderer(tiny_tokenizer), envs=envs,
                             env=out.env)
    assert (done.trajectory.status, done.trajectory.reward) == ("completed", 1.0)
    assert CountingCalculator.stepped == uninterrupted  # each action stepped once, none repeated
