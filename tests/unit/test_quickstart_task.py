"""The quickstart task: fixed-shape problems, correct demonstrations, and the environment that scores them."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from agentrl.agent.tools import parse_action
from agentrl.messages import ChatMessage, Task
from envs.arith import evaluate, format_number
from envs.calculator import CalculatorEnv
from envs.quickstart import (
    answer_demonstration,
    demonstration,
    make_problem,
    write_dataset,
)


def test_problems_have_one_shape_and_four_digit_answers() -> None:
    rng = random.Random(0)
    for _ in range(500):
        question, expr, answer = make_problem(rng)
        assert re.fullmatch(r"\d\d\*\d\d\+\d\d", expr) and question == f"What is {expr}?"
        assert len(answer) == 4 and answer == format_number(evaluate(expr))


def test_dataset_is_seeded_and_splits_are_disjoint(tmp_path: Path) -> None:
    write_dataset(tmp_path / "a", n_train=50, n_eval=20, n_demos=200, tool_fraction=0.3, seed=1)
    write_dataset(tmp_path / "b", n_train=50, n_eval=20, n_demos=200, tool_fraction=0.3, seed=1)
    for name in ("train.jsonl", "eval.jsonl", "sft.jsonl"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()

    def questions(name: str) -> set[str]:
        rows = [json.loads(line) for line in (tmp_path / "a" / name).read_text().splitlines()]
        return {(r.get("prompt") or r.get("messages"))[-1 if "prompt" in r else 0]["content"] for r in rows}

    assert not questions("eval.jsonl") & questions("train.jsonl")
    assert not questions("eval.jsonl") & questions("sft.jsonl")
    demos = [json.loads(line)["messages"] for line in (tmp_path / "a" / "sft.jsonl").read_text().splitlines()]
    assert 0.2 < sum(len(d) > 2 for d in demos) / len(demos) < 0.4  # about 30% call the tool


def test_answer_demos_train_only_the_answer(tmp_path: Path) -> None:
    question, expr, answer = make_problem(random.Random(5))
    demo = answer_demonstration(question, expr, answer)
    assert [m.get("weight", 1) for m in demo if m["role"] == "assistant"] == [0, 1]
    assert [{k: v for k, v in m.items() if k != "weight"} for m in demo] == demonstration(question, expr, answer, True)
    write_dataset(tmp_path, n_train=10, n_eval=5, n_demos=100, tool_fraction=0.3, seed=0, n_answer_demos=50)
    demos = [json.loads(line)["messages"] for line in (tmp_path / "sft.jsonl").read_text().splitlines()]
    assert len(demos) == 150 and sum(d[1].get("weight") == 0 for d in demos) == 50
    assert sum(d[1].get("weight") == 0 for d in demos[:75]) not in (0, 50)  # shuffled in, not appended


async def test_the_environment_rewards_the_demonstrated_episode() -> None:
    question, expr, answer = make_problem(random.Random(3))
    demo = demonstration(question, expr, answer, use_tool=True)
    task = Task(id="t", group_id="g", prompt=[ChatMessage(role="user", content=question)], label=answer)
    env = CalculatorEnv(advertise_tools=False)
    obs = await env.reset(task)
    assert obs.tools in (None, [])  # no schema in the prompt
    call = await env.step(parse_action(demo[1]["content"]))
    assert not call.done and call.observation.messages[0].content == answer
    final = await env.step(parse_action(demo[-1]["content"]))
    assert final.done and final.reward == 1.0
    await env.reset(task)
    wrong = await env.step(parse_action("The answer is 1234."))
    assert wrong.done and wrong.reward == (1.0 if answer == "1234" else 0.0)
