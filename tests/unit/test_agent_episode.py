"""Episodes through the SDK: token fidelity turn by turn, endings, aborts and resumption."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from agentrl.agent import ChatRenderer, EpisodeContext, current_episode, run_episode
from agentrl.env import LocalEnvs
from agentrl.generation import GenerateOutput
from agentrl.messages import ChatMessage, SamplingParams, Task, Trajectory
from agents import single_turn, tool_agent
from envs.calculator import CalculatorEnv
from envs.math_verifier import math_reward
from tests.fixtures.envs import ScriptedGenerator

CALL = '<tool_call>{{"name": "calculator", "arguments": {{"expression": "{}"}}}}</tool_call>'
ENVS = LocalEnvs({"calculator": CalculatorEnv})


def _task(label: str = "84", env: str = "calculator", **kw: Any) -> Task:
    return Task(id="t1", group_id="g1", prompt=[ChatMessage(role="user", content="What is 12*(3+4)?")],
                env=env, label=label, sampling=SamplingParams(max_new_tokens=64), **kw)


async def _run(agent: Any, task: Task, gen: Any, tok: Any, **kw: Any) -> Any:
    return await run_episode(agent, task, generator=gen, chat=ChatRenderer(tok), envs=ENVS, **kw)


def _model_segments(t: Trajectory) -> list[tuple[int, int]]:
    return [(turn.start, turn.end) for turn in t.turns if turn.kind == "model"]


async def test_tool_episode_trains_on_exactly_the_generated_tokens(tiny_tokenizer: Any) -> None:
    gen = ScriptedGenerator(tiny_tokenizer, [CALL.format("12*(3+4)"), CALL.format("84/1"), "\\boxed{84}"])
    out = await _run(tool_agent.run_episode, _task(), gen, tiny_tokenizer)
    t = out.trajectory
    assert (t.status, t.reward, len(gen.calls)) == ("completed", 1.0, 3)
    # Each call's input is the previous input + the previous output + masked observation tokens: append-only.
    for k in range(1, 3):
        prev = np.concatenate([gen.calls[k - 1], gen.outputs[k - 1].output_ids])
        assert gen.calls[k][: len(prev)].tolist() == prev.tolist()
    # The trainable tokens are the generator's outputs, turn by turn, with their logprobs and versions.
    segs = _model_segments(t)
    assert [t.tokens[s:e].tolist() for s, e in segs] == [o.output_ids.tolist() for o in gen.outputs]
    mask = np.zeros(len(t.tokens), dtype=np.uint8)
    for (s, e), o in zip(segs, gen.outputs, strict=True):
        mask[s:e] = 1
        np.testing.assert_array_equal(t.logprobs[s:e], o.logprobs)
        assert t.versions[s:e].tolist() == o.versions.tolist()
    assert t.loss_mask.tolist() == mask.tolist()
    assert (t.versions[mask == 0] == -1).all() and (t.logprobs[mask == 0] == 0).all()
    # The final sequence is the whole conversation, and the last input was a prefix of it.
    assert t.tokens[: len(gen.calls[-1])].tolist() == gen.calls[-1].tolist()
    text = tiny_tokenizer.decode(t.tokens, skip_special_tokens=False)
    assert "<tool_response>\n84\n</tool_response>" in text and text.endswith("\\boxed{84}<|im_end|>")
    assert [turn.kind for turn in t.turns] == ["prompt", "model", "tool", "model", "tool", "model"]
    assert (t.turns[0].start, t.turns[0].end) == (0, t.prompt_len)


async def test_wrong_answer_scores_zero_and_malformed_call_is_an_observation(tiny_tokenizer: Any) -> None:
    gen = ScriptedGenerator(tiny_tokenizer, ["<tool_call>{not json</tool_call>", "\\boxed{83}"])
    out = await _run(tool_agent.run_episode, _task(), gen, tiny_tokenizer)
    assert (out.trajectory.status, out.trajectory.reward) == ("completed", 0.0)
    tool_turn = out.trajectory.turns[2]
    assert tool_turn.kind == "tool" and "error: tool call 0: invalid JSON" in tool_turn.text


async def test_max_turns_and_context_budget_truncate(tiny_tokenizer: Any) -> None:
    loop = ScriptedGenerator(tiny_tokenizer, lambda i: CALL.format(f"{i}+1"))
    out = await _run(tool_agent.make_tool_agent(max_turns=3), _task(), loop, tiny_tokenizer)
    assert (out.trajectory.status, len(loop.calls)) == ("truncated", 3)
    loop2 = ScriptedGenerator(tiny_tokenizer, lambda i: CALL.format(f"{i}+1"))
    out = await _run(tool_agent.make_tool_agent(max_turns=50), _task(), loop2, tiny_tokenizer, max_context=300)
    t = out.trajectory
    # The last generation is clamped to the budget: the sequence ends exactly at it, cut by "length".
    assert (t.status, len(t.tokens), t.turns[-1].finish_reason) == ("truncated", 300, "length")


async def test_single_turn_with_reward_function(tiny_tokenizer: Any) -> None:
    gen = ScriptedGenerator(tiny_tokenizer, ["so the answer: 3/4"])
    task = _task(label="0.75", env="")
    out = await _run(single_turn.run_episode, task, gen, tiny_tokenizer, reward=math_reward)
    assert (out.trajectory.status, out.trajectory.reward) == ("completed", 1.0)
    assert out.trajectory.prompt_len == len(gen.calls[0])


async def test_agent_exception_fails_with_traceback(tiny_tokenizer: Any) -> None:
    async def broken(ctx: EpisodeContext, task: Task) -> Trajectory | None:
        ctx.start()
        await ctx.generate()
        raise KeyError("boom in agent")

    out = await _run(broken, _task(env=""), ScriptedGenerator(tiny_tokenizer, ["hi"]), tiny_tokenizer)
    t = out.trajectory
    assert t.status == "failed" and t.turns[-1].kind == "error"
    assert "Traceback" in t.turns[-1].text and "boom in agent" in t.turns[-1].text
    assert t.num_trained_tokens > 0  # what it had is kept


async def test_rejected_episode_and_context_var(tiny_tokenizer: Any) -> None:
    seen: list[str] = []

    async def rejecting(ctx: EpisodeContext, task: Task) -> Trajectory | None:
        seen.append(current_episode().trajectory_id)
        return None

    out = await _run(rejecting, _task(env=""), ScriptedGenerator(tiny_tokenizer, []), tiny_tokenizer)
    assert seen == ["t1-0"]
    assert out.trajectory.status == "failed" and out.trajectory.metadata["rejected"] is True
    with pytest.raises(RuntimeError, match="not inside an agentrl episode"):
        current_episode()


async def test_episode_timeout_is_an_infrastructure_failure(tiny_tokenizer: Any) -> None:
    class Slow(ScriptedGenerator):
        async def generate(self, *a: Any, **kw: Any) -> GenerateOutput:
            await asyncio.sleep(10)
            raise AssertionError("unreachable")

    out = await _run(single_turn.run_episode, _task(env=""), Slow(tiny_tokenizer, []), tiny_tokenizer,
                     reward=math_reward, timeout=0.05)
    assert out.trajectory.status == "failed" and "episode timeout" in out.trajectory.turns[-1].text
    assert out.infra is not None and "episode timeout" in out.trajectory.metadata["infra"]


class AbortingGenerator(ScriptedGenerator):
    """Cuts call number ``abort_at`` after ``keep`` tokens with finish_reason 'abort'."""

    def __init__(self, *a: Any, abort_at: int, keep: int, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.abort_at, self.keep = abort_at, keep

    async def generate(self, input_ids: Any, sampling: SamplingParams, **kw: Any) -> GenerateOutput:
        out = await super().generate(input_ids, sampling, **kw)
        if len(self.outputs) - 1 != self.abort_at:
            return out
        cut = GenerateOutput(output_ids=out.output_ids[: self.keep], logprobs=out.logprobs[: self.keep],
                             versions=out.versions[: self.keep], finish_reason="abort", rid=out.rid)
        self.outputs[-1] = cut
        return cut


async def test_abort_mid_generation_resumes_token_for_token(tiny_tokenizer: Any) -> None:
    final = "\\boxed{84}"
    first = AbortingGenerator(tiny_tokenizer, [CALL.format("12*(3+4)"), final], abort_at=1, keep=3, version=1)
    out = await _run(tool_agent.run_episode, _task(), first, tiny_tokenizer)
    assert out.trajectory.status == "aborted" and out.resume is not None
    resume = out.resume
    assert (resume.id, resume.attempt) == ("t1", 1)
    partial = resume.partial
    assert partial is not None and partial.state == {"turns": 1, "reward": 0.0}
    assert partial.tokens.tolist() == out.trajectory.tokens.tolist()
    # The resumed run continues the cut model turn: the engine gets the partial tokens as they were.
    rest = tiny_tokenizer.encode(final, add_special_tokens=False)[3:]
    second = ScriptedGenerator(tiny_tokenizer, [tiny_tokenizer.decode(rest)], version=2)
    out2 = await _run(tool_agent.run_episode, resume, second, tiny_tokenizer, env=out.env)  # resumed on its env
    t = out2.trajectory
    assert (t.status, t.reward, t.id) == ("completed", 1.0, "t1-1")
    assert second.calls[0].tolist() == partial.tokens.tolist()
    n = len(partial.tokens)
    assert t.tokens[:n].tolist() == partial.tokens.tolist()
    assert t.versions[:n].tolist() == partial.versions.tolist()  # older tokens keep their versions
    last = t.turns[-1]
    assert last.kind == "model" and last.text == final
    assert set(t.versions[last.start : last.end].tolist()) == {1, 2}  # one turn spanning two versions
    marker = t.turns[-2]  # where the abort fell, inside the resumed turn
    assert (marker.kind, marker.start, marker.end) == ("abort", n, n) and last.start < n < last.end
    assert second.calls[0].size and [x.kind for x in t.turns] == ["prompt", "model", "tool", "abort", "model"]


async def test_abort_requested_between_calls_stops_at_next_generate(tiny_tokenizer: Any) -> None:
    async def agent(ctx: EpisodeContext, task: Task) -> Trajectory | None:
        ctx.start()
        await ctx.generate()
        ctx.state["after_first"] = True
        await ctx.abort()
        await ctx.generate()
        raise AssertionError("generate must raise after an abort")

    gen = ScriptedGenerator(tiny_tokenizer, ["one", "two"])
    out = await _run(agent, _task(env=""), gen, tiny_tokenizer)
    assert out.trajectory.status == "aborted" and len(gen.calls) == 1
    assert out.resume is not None and out.resume.partial is not None
    assert out.resume.partial.state == {"after_first": True}


async def test_cancel_after_abort_rolls_back_to_last_safe_point(tiny_tokenizer: Any) -> None:
    stuck = asyncio.Event()

    async def agent(ctx: EpisodeContext, task: Task) -> Trajectory | None:
        ctx.start()
        ctx.state["turn"] = 1
        await ctx.generate()
        ctx.state["turn"] = 2
        stuck.set()
        await asyncio.sleep(30)  # e.g. a slow tool call
        raise AssertionError("unreachable")

    gen = ScriptedGenerator(tiny_tokenizer, ["one"])
    holder: list[EpisodeContext] = []
    task = asyncio.create_task(_run(agent, _task(env=""), gen, tiny_tokenizer, on_start=holder.append))
    await stuck.wait()
    await holder[0].abort()
    task.cancel()
    out = await task
    partial = out.resume.partial
    assert out.trajectory.status == "aborted"
    assert partial.tokens.tolist() == gen.calls[0].tolist()  # back to before the interrupted turn
    assert partial.state == {"turn": 1}


async def test_observation_crossing_the_budget_ends_truncated_before_generating(tiny_tokenizer: Any) -> None:
    gen = ScriptedGenerator(tiny_tokenizer, lambda i: CALL.format("1+1"))
    first = await _run(tool_agent.make_tool_agent(max_turns=50), _task(), gen, tiny_tokenizer, max_context=10_000)
    prompt_and_one_turn = first.trajectory.turns[2].end  # prompt + first model turn + its tool result
    gen2 = ScriptedGenerator(tiny_tokenizer, lambda i: CALL.format("1+1"))
    out = await _run(tool_agent.make_tool_agent(max_turns=50), _task(), gen2, tiny_tokenizer,
                     max_context=prompt_and_one_turn - 1)
    t = out.trajectory
    assert t.status == "truncated" and "context budget" in t.turns[-1].text
    assert len(gen2.calls) == 1 and len(t.tokens) == prompt_and_one_turn  # no generation past the budget
