"""Math answer extraction and equivalence."""

from __future__ import annotations

import pytest

from agentrl.messages import ChatMessage, Task
from envs.arith import ExpressionError, evaluate
from envs.math_verifier import extract_answer, is_equivalent, math_reward


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("so \\boxed{\\frac{1}{2}} and later \\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),
        ("nested \\boxed{\\frac{\\sqrt{2}}{2}} done", "\\frac{\\sqrt{2}}{2}"),
        ("We get 12 then 84.\nAnswer: 84.", "84"),
        ("the answer is -3/6", "-3/6"),
        ("first 12, then 7, finally 1,000 apples", "1,000"),
        ("no digits here", None),
        ("unclosed \\boxed{12", "12"),
    ],
)
def test_extract_answer(text: str, answer: str | None) -> None:
    assert extract_answer(text) == answer


@pytest.mark.parametrize(
    ("candidate", "label", "same"),
    [
        ("\\frac{3}{4}", "0.75", True),
        ("\\dfrac{6}{8}", "3/4", True),
        ("-3/6", "-0.5", True),
        ("1,000", "1000", True),
        ("$84$", "84", True),
        ("2^{10}", "1024", True),
        ("\\sqrt{8}", "2\\sqrt{2}", True),
        ("2x+1", "1+2*x", True),
        ("x^2-1", "(x-1)(x+1)", True),
        ("\\text{Paris}", "paris", True),
        ("0.333", "1/3", False),
        ("x^2", "x^3", False),
        ("85", "84", False),
        (None, "84", False),
        ("9**9**9**9", "1", False),  # refused (exponent too large), not evaluated
    ],
)
def test_is_equivalent(candidate: str | None, label: str, same: bool) -> None:
    assert is_equivalent(candidate, label) is same


def test_evaluator_refuses_code() -> None:
    for bad in ["__import__('os')", "(1).real", "[1][0]", "open('x')", "1 if 1 else 2"]:
        with pytest.raises(ExpressionError):
            evaluate(bad)
    with pytest.raises(ExpressionError, match="division by zero"):
        evaluate("1/0")


async def test_math_reward() -> None:
    task = Task(id="t", group_id="g", prompt=[ChatMessage(role="user", content="?")], label="3/4")
    assert await math_reward(task, "thus \\boxed{0.75}") == 1.0
    assert await math_reward(task, "thus \\boxed{0.7}") == 0.0
    with pytest.raises(ValueError, match="needs a label"):
        await math_reward(Task(id="u", group_id="g", prompt_ids=[1]), "1")
