"""The kernel environment and the multi-turn kernel agent against the real sandbox (Triton's CPU interpreter):
multi-turn feedback, early stop, turn limit, rewards of the generated template solutions, snapshot/restore,
and an APRIL abort mid-episode resumed without evaluating a scored turn again."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from agentrl.agent import ChatRenderer, run_episode
from agentrl.env import Action, LocalEnvs
from agentrl.generation import GenerateOutput
from agentrl.messages import ChatMessage, SamplingParams, Task
from agents.kernel_agent import make_kernel_agent
from envs.kernelgen import KernelEnv, templates
from envs.kernelgen.dataset import SHORT_INSTRUCTIONS, prompt_text
from envs.kernelgen.problem import parse_problem
from tests.fixtures.envs import ScriptedGenerator

pytest.importorskip("triton")

KG = Path(__file__).resolve().parents[2] / "envs" / "kernelgen"
EXPR = templates.Expression(torch="torch.sigmoid(x) * y", triton="tl.sigmoid(x) * y", inputs=("x", "y"))
MASKED = f"```python\n{templates.solution_source(EXPR, masked=True)}```"
PLAIN = f"Fast version:\n```python\n{templates.solution_source(EXPR, masked=False)}```"


class CountingEnv(KernelEnv):
    """A CPU KernelEnv that counts the evaluations it ran (across instances)."""

    evaluations: ClassVar[int] = 0

    def __init__(self) -> None:
        super().__init__(device="cpu", sets=2, concurrency=2, wall_s=240.0)  # generous: the machine may be loaded

    async def _evaluate(self, *args: Any, **kwargs: Any) -> Any:
        type(self).evaluations += 1
        return await super()._evaluate(*args, **kwargs)


def first_bad_index(feedback: str) -> int:
    """The element index the feedback points at (in the garbage tail its first entry may happen to match, or be
    finite while a later one is NaN)."""
    found = re.search(r"index \((\d+),\)", feedback)
    assert found, feedback
    return int(found.group(1))


def _task(n: int = 1000, tid: str = "k1") -> Task:
    problem = parse_problem("sigmoid_mul", templates.problem_source(EXPR, n))
    return Task(id=tid, group_id="g", prompt=[ChatMessage(role="user", content=prompt_text(problem.source,
                                                                                              SHORT_INSTRUCTIONS))],
                env="kernelgen", env_args=problem.env_args(), sampling=SamplingParams(max_new_tokens=512))


async def _episode(task: Task, gen: Any, tok: Any, **kw: Any) -> Any:
    return await run_episode(make_kernel_agent(), task, generator=gen, chat=ChatRenderer(tok),
                             envs=LocalEnvs({"kernelgen": CountingEnv}), **kw)


async def test_template_solutions_are_rewarded_by_style_and_size() -> None:
    env = KernelEnv(device="cpu", sets=2, wall_s=240.0)
    await env.reset(_task(n=1024))  # a block multiple: both styles are right
    aligned_plain = await env.step(Action(text=PLAIN))
    await env.reset(_task(n=1000))  # ragged: only the masked style is
    ragged_plain = await env.step(Action(text=PLAIN))
    ragged_masked = await env.step(Action(text=MASKED))
    assert (aligned_plain.reward, aligned_plain.done, aligned_plain.info["correct"]) == (0.3, True, True)
    assert (ragged_plain.reward, ragged_plain.done, ragged_plain.info["outcome"]) == (0.1, False, "wrong")
    # the unwritten tail is whatever torch.empty left there: a value mismatch, or NaN/Inf, from index 768 = 3 * 256
    assert 768 <= first_bad_index(ragged_plain.observation.messages[0].content) < 1000
    assert (ragged_masked.reward, ragged_masked.info["episode_reward"], ragged_masked.info["turn"]) == (0.3, 0.3, 2)
    snap = await env.snapshot()
    fresh = KernelEnv(device="cpu")
    await fresh.restore(snap)
    assert fresh.history == env.history and fresh.problem == env.problem


async def test_feedback_turn_then_fix(tiny_tokenizer: Any) -> None:
    gen = ScriptedGenerator(tiny_tokenizer, [PLAIN, MASKED, "unused"])
    t = (await _episode(_task(), gen, tiny_tokenizer)).trajectory
    assert (t.status, t.reward, t.correct, t.metadata["turns"]) == ("completed", 0.3, True, 2)
    assert t.metadata["outcomes"] == ["wrong", "correct"] and t.turn_rewards == [0.1]
    feedback = next(turn for turn in t.turns if turn.kind == "env")
    assert "Output mismatch" in feedback.text or "NaN/Inf" in feedback.text
    assert 768 <= first_bad_index(feedback.text) < 1000  # in the tail the plain kernel leaves unwritten
    assert t.loss_mask[feedback.start:feedback.end].sum() == 0
    assert len(gen.calls) == 2  # stopped early once correct


async def test_turn_limit_and_no_code(tiny_tokenizer: Any) -> None:
    gen = ScriptedGenerator(tiny_tokenizer, ["I cannot do that.", PLAIN, PLAIN, MASKED])
    t = (await _episode(_task(), gen, tiny_tokenizer)).trajectory
    assert (t.reward, t.correct, t.metadata["turns"], len(gen.calls)) == (0.1, False, 3, 3)
    assert t.metadata["outcomes"] == ["no_code", "wrong", "wrong"]


class AbortSecondTurn(ScriptedGenerator):
    """Answers turn 1 in full, then cuts turn 2 after a few tokens with an abort (APRIL)."""

    async def generate(self, input_ids: Any, sampling: SamplingParams, **kw: Any) -> GenerateOutput:
        out = await super().generate(input_ids, sampling, **kw)
        if len(self.outputs) == 2:
            out = GenerateOutput(output_ids=out.output_ids[:5], logprobs=out.logprobs[:5], versions=out.versions[:5],
                                 finish_reason="abort", rid=out.rid)
            self.outputs[-1] = out
        return out


async def test_resume_mid_episode_does_not_evaluate_a_scored_turn_again(tiny_tokenizer: Any) -> None:
    CountingEnv.evaluations = 0
    first = await _episode(_task(), AbortSecondTurn(tiny_tokenizer, [PLAIN, MASKED]), tiny_tokenizer)
    assert first.trajectory.status == "aborted" and first.resume is not None
    assert CountingEnv.evaluations == 1
    resume = first.resume
    assert resume.partial is not None and [t["outcome"] for t in resume.partial.state["turns"]] == ["wrong"]
    rest = MASKED[len(tiny_tokenizer.decode(first.trajectory.tokens[first.trajectory.loss_mask == 1][-5:])):]
    second = ScriptedGenerator(tiny_tokenizer, [rest])
    kept = getattr(first, "env", None)  # the runtime keeps the environment for a resume on the same worker
    out = await _episode(resume, second, tiny_tokenizer, **({"env": kept} if kept is not None else {}))
    t = out.trajectory
    assert CountingEnv.evaluations == 2  # only the resumed turn was evaluated
    assert (t.status, t.reward, t.correct, t.metadata["outcomes"]) == ("completed", 0.3, True, ["wrong", "correct"])
    assert np.array_equal(t.tokens[: len(resume.partial.tokens)], resume.partial.tokens)
