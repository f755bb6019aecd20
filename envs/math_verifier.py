"""Math answer verification: extract the final answer from a response and compare it to a label.

* :func:`extract_answer` — the last ``\\boxed{...}`` (nested braces allowed), else the
  text after the last ``answer:`` / ``answer is``, else the last number in the text.
* :func:`is_equivalent` — equal as numbers (integers, decimals, fractions, LaTeX
  ``\\frac``, simple expressions such as ``2^3 + 1/2``, evaluated exactly), or as
  expressions in single-letter variables (checked at random rational points), or
  as normalized strings.
* :func:`math_reward` — the reward extension point: ``async (task, response) -> 1.0 | 0.0``.

Input is bounded (a response is cut to its last 20,000 characters, expressions to
500), so verification is cheap enough to run on the event loop.
"""

from __future__ import annotations

import random
import re
from fractions import Fraction

from agentrl.messages import Task
from envs.arith import ExpressionError, Number, evaluate

__all__ = ["extract_answer", "is_equivalent", "math_reward", "normalize"]

MAX_RESPONSE_CHARS = 20_000
_ANSWER = re.compile(r"answer\s*(?:is|:)\s*:?\s*(.+)", re.I)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_VARS = re.compile(r"(?<![A-Za-z_])([a-df-z])(?![A-Za-z_(])")  # single letters except e (Euler's number)


def extract_answer(text: str) -> str | None:
    """The final answer in ``text``, or ``None`` if there is none."""
    text = text[-MAX_RESPONSE_CHARS:]
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    matches = list(_ANSWER.finditer(text))
    if matches:
        answer = matches[-1].group(1).strip().splitlines()[0].strip().rstrip(".").strip()
        if answer:
            return answer
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _last_boxed(text: str) -> str | None:
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, j = 1, i
    while j < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    return text[i : j - 1] if depth == 0 else None


_LATEX = [
    (re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}"), r"(\1)/(\2)"),
    (re.compile(r"\\sqrt\{([^{}]*)\}"), r"sqrt(\1)"),
    (re.compile(r"\\text\{([^{}]*)\}"), r"\1"),
    (re.compile(r"\\(left|right|,|!|;|quad|displaystyle)"), ""),
    (re.compile(r"\\(cdot|times)"), "*"),
    (re.compile(r"\\div"), "/"),
    (re.compile(r"\\pi"), "pi"),
    (re.compile(r"(?<=\d),(?=\d{3}\b)"), ""),  # thousands separators
    (re.compile(r"\^"), "**"),
    (re.compile(r"[{}$\s]"), ""),
]


def normalize(answer: str) -> str:
    """A canonical string form: LaTeX fractions/roots/operators to plain syntax, no spaces, ``$``, braces."""
    s = answer.strip().rstrip(".")
    for _ in range(3):  # nested \frac{\frac{..}{..}}{..} unwrap one level per pass
        for pattern, repl in _LATEX:
            s = pattern.sub(repl, s)
    s = re.sub(r"(\d)(?=[a-df-z(])", r"\1*", s)  # implicit products: 2x, 2(3), 2sqrt(2) (not 1e3)
    s = re.sub(r"\)(?=[\w(])", ")*", s)  # (x-1)(x+1)
    s = s.rstrip("%") if s.endswith("%") else s
    return s.lower() if s.isalpha() else s


def is_equivalent(candidate: str | None, label: object) -> bool:
    """Whether ``candidate`` denotes the same value as ``label`` (number, fraction, expression or string)."""
    if candidate is None:
        return False
    a, b = normalize(candidate), normalize(str(label))
    if a == b:
        return True
    names = sorted(set(_VARS.findall(a)) | set(_VARS.findall(b)))
    if names:
        return _same_function(a, b, names)
    va, vb = _value(a), _value(b)
    return va is not None and vb is not None and _close(va, vb)


def _value(expr: str, env: dict[str, Number] | None = None) -> Number | None:
    try:
        return evaluate(expr, env)
    except ExpressionError:
        return None


def _close(a: Number, b: Number) -> bool:
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        return a == b
    return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(a)), abs(float(b)))


def _same_function(a: str, b: str, names: list[str]) -> bool:
    rng = random.Random(0)
    for _ in range(4):
        env: dict[str, Number] = {n: Fraction(rng.randint(-97, 97), rng.randint(1, 13)) for n in names}
        va, vb = _value(a, env), _value(b, env)
        if va is None or vb is None or not _close(va, vb):
            return False
    return True


async def math_reward(task: Task, response: str) -> float:
    """1.0 if the answer extracted from ``response`` is equivalent to ``task.label``, else 0.0."""
    if task.label is None:
        raise ValueError(f"task {task.id}: math_reward needs a label (the reference answer)")
    return 1.0 if is_equivalent(extract_answer(response), task.label) else 0.0
