"""The quickstart task: two-step arithmetic that a tiny model cannot do in its head but can with a calculator.

``python -m envs.quickstart --out DIR`` writes, deterministically from ``--seed``:

* ``train.jsonl`` / ``eval.jsonl``: prompts for RL and held-out evaluation, one
  ``{"prompt": [user], "label": answer, "env": "calculator"}`` per line;
* ``sft.jsonl``: correct demonstrations, ``{"messages": [...]}``, of which only
  ``--tool-fraction`` call the calculator; the rest state the answer directly —
  which the model can copy the form of but not the arithmetic, so after the warm-up
  it answers mostly without the tool and mostly wrong. RL has to discover that
  calling the tool pays. ``--answer-demos`` adds tool conversations whose call is
  context only (``"weight": 0``): they train reading the answer off the tool's
  result without changing how often the model calls the tool.

Prompts carry no tool schema (nor system message), to keep them short for a CPU run:
the demonstrations teach the ``<tool_call>`` format, and the run uses the calculator environment with
``advertise_tools: false`` (configs/quickstart.yaml).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

from envs.arith import evaluate, format_number

__all__ = ["answer_demonstration", "demonstration", "make_problem", "write_dataset"]

# Every problem has the same shape, ab*cd+ef, and its result always has 4 digits. A fixed shape means a
# fixed distance between where the model reads digits and where it writes them (every digit is its own
# token), which a tiny model learns to copy in a few hundred SFT steps. (With a second form, ab*cd-ef, the
# 4-layer model copied every digit but, even after 1,000 steps, not the operator.)
_FORM = "{a}*{b}+{c}"


def make_problem(rng: random.Random) -> tuple[str, str, str]:
    """``(question, expression, answer)`` of a random two-operation problem with a 4-digit answer."""
    expr = _FORM.format(a=rng.randint(34, 99), b=rng.randint(34, 99), c=rng.randint(10, 99))
    answer = format_number(evaluate(expr))
    return f"What is {expr}?", expr, answer


def _prompt(question: str) -> list[dict[str, str]]:
    # No system message: the demonstrations teach the tool-call format, and short prompts keep a CPU run fast.
    return [{"role": "user", "content": question}]


def demonstration(question: str, expr: str, answer: str, use_tool: bool) -> list[dict[str, Any]]:
    """A correct conversation, with or without the tool call."""
    # restating the problem makes every demonstration practise copying it, the skill a tool call needs
    final = {"role": "assistant", "content": f"The answer to {expr} is {answer}."}
    if not use_tool:
        return [*_prompt(question), final]
    call = json.dumps({"name": "calculator", "arguments": {"expression": expr}})
    return [*_prompt(question), {"role": "assistant", "content": f"<tool_call>{call}</tool_call>"},
            {"role": "tool", "content": answer}, final]


def answer_demonstration(question: str, expr: str, answer: str) -> list[dict[str, Any]]:
    """A tool conversation in which only the final answer is trained (the call is context, ``weight`` 0).

    It teaches reading the answer off the tool's result without making the model call the tool more often.
    """
    demo = demonstration(question, expr, answer, use_tool=True)
    demo[1] = {**demo[1], "weight": 0}
    return demo


def write_dataset(out: Path, *, n_train: int, n_eval: int, n_demos: int, tool_fraction: float, seed: int,
                  n_answer_demos: int = 0) -> None:
    """Write train/eval prompts and SFT demonstrations (disjoint questions) into ``out``."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()

    def fresh() -> tuple[str, str, str]:
        while True:
            problem = make_problem(rng)
            if problem[0] not in seen:
                seen.add(problem[0])
                return problem

    def rows(n: int) -> list[str]:
        return [json.dumps({"prompt": _prompt(q), "label": a, "env": "calculator"}) for q, _, a in
                (fresh() for _ in range(n))]

    (out / "eval.jsonl").write_text("\n".join(rows(n_eval)) + "\n")
    (out / "train.jsonl").write_text("\n".join(rows(n_train)) + "\n")
    demos = [demonstration(*fresh(), use_tool=rng.random() < tool_fraction) for _ in range(n_demos)]
    demos += [answer_demonstration(*fresh()) for _ in range(n_answer_demos)]
    rng.shuffle(demos)
    (out / "sft.jsonl").write_text("\n".join(json.dumps({"messages": d}) for d in demos) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--train", type=int, default=4000)
    p.add_argument("--eval", type=int, default=100)
    p.add_argument("--demos", type=int, default=2000)
    p.add_argument("--tool-fraction", type=float, default=0.25)
    p.add_argument("--answer-demos", type=int, default=0,
                   help="extra tool conversations that train only the final answer (the call is context)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    write_dataset(a.out, n_train=a.train, n_eval=a.eval, n_demos=a.demos, tool_fraction=a.tool_fraction, seed=a.seed,
                  n_answer_demos=a.answer_demos)


if __name__ == "__main__":
    main()
