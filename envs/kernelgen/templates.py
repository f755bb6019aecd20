"""Generated elementwise problems and template Triton solutions: the data of the CPU warm-up.

``python -m envs.kernelgen.templates --out DIR`` writes, deterministically from ``--seed``:

* ``problems/train/*.py`` and ``problems/eval/*.py``: KernelBench-style problems ``out = expr(x[, y])`` over
  ``torch.exp/abs/sin/cos/sigmoid``, ``torch.maximum/minimum``, ``+ - *`` and constants, with sizes that are
  *not* multiples of the kernel's block (turn them into tasks with :mod:`envs.kernelgen.dataset`);
* ``sft.jsonl``: chat demonstrations ``{"messages": [user prompt, assistant solution]}`` for *other*
  expressions (the RL and eval expressions are held out) whose sizes *are* block multiples;
* ``corpus.jsonl``: the demonstrations' text, one JSON string per line, to train a tokenizer on
  (``agentrl model init --corpus``).

Every demonstration is a correct solution, in one of two styles: the general one (an ``m = i < n``
bounds mask on every load and store, grid ``triton.cdiv(n, BLOCK)``) in ``--masked-fraction`` of them, and
otherwise the style that is right only when ``n`` is a block multiple (no mask, grid ``n // BLOCK``). On the
demonstrations' sizes both are correct; on the held-out sizes only the masked one is (the other leaves the
tail unwritten, which the evaluation reports as a mismatch). A model warmed up on these copies the
expression well but mostly writes the narrow style; RL on held-out compositions has to make the bounds
mask the habit — the lesson every Triton programmer learns first.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from envs.kernelgen.dataset import SHORT_INSTRUCTIONS, prompt_text

__all__ = ["Expression", "make_expressions", "problem_source", "solution_source", "write_templates"]

UNARY = ("exp", "abs", "sin", "cos", "sigmoid")
BINARY_FN = ("maximum", "minimum")
BINARY_OP = ("+", "-", "*")
CONSTANTS = ("0.5", "2.0", "3.0")
BLOCK = 256


@dataclass(frozen=True, slots=True)
class Expression:
    """An elementwise expression over the inputs, written once for torch and once for triton.language."""

    torch: str
    triton: str
    inputs: tuple[str, ...]


def _node(rng: random.Random, inputs: tuple[str, ...], depth: int) -> tuple[str, str, bool]:
    """(torch text, triton.language text, whether it is a bare binary operation) of a random expression tree."""
    if depth == 0:
        name = rng.choice(inputs)
        return name, name, False
    kind = rng.choice(("unary", "binop", "binfn", "const"))
    a_t, a_l, _ = _node(rng, inputs, depth - 1)
    if kind == "unary":
        fn = rng.choice(UNARY)
        return f"torch.{fn}({a_t})", f"tl.{fn}({a_l})", False
    if kind == "binfn":
        fn = rng.choice(BINARY_FN)
        b_t, b_l, _ = _node(rng, inputs, depth - 1)
        return f"torch.{fn}({a_t}, {b_t})", f"tl.{fn}({a_l}, {b_l})", False
    op = rng.choice(BINARY_OP)
    a_t, a_l = _operand(a_t, a_l, _node_is_binop(a_t))
    if kind == "const":
        c = rng.choice(CONSTANTS)
        return f"{a_t} {op} {c}", f"{a_l} {op} {c}", True
    b_t, b_l, b_bin = _node(rng, inputs, depth - 1)
    b_t, b_l = _operand(b_t, b_l, b_bin)
    return f"{a_t} {op} {b_t}", f"{a_l} {op} {b_l}", True


def _node_is_binop(text: str) -> bool:
    depth = 0
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if depth == 0 and ch in "+-*":
            return True
    return False


def _operand(t: str, lang: str, binop: bool) -> tuple[str, str]:
    return (f"({t})", f"({lang})") if binop else (t, lang)


def make_expressions(rng: random.Random, count: int) -> list[Expression]:
    """``count`` distinct expressions of one or two inputs (each input used), depth 1 or 2."""
    seen: dict[str, Expression] = {}
    while len(seen) < count:
        inputs = ("x",) if rng.random() < 0.4 else ("x", "y")
        t, lang, _ = _node(rng, inputs, rng.choice((1, 2)))
        if all(re.search(rf"\b{name}\b", t) for name in inputs) and t not in seen:
            seen[t] = Expression(torch=t, triton=lang, inputs=inputs)
    return list(seen.values())


def problem_source(expr: Expression, n: int) -> str:
    """A KernelBench-style problem computing ``expr`` on inputs of ``n`` elements."""
    args = ", ".join(expr.inputs)
    inputs = ", ".join("torch.randn(N)" for _ in expr.inputs)
    return (f"import torch\nimport torch.nn as nn\n\nN = {n}\n\n\nclass Model(nn.Module):\n"
            f"    def forward(self, {args}):\n        return {expr.torch}\n\n\n"
            f"def get_inputs():\n    return [{inputs}]\n\n\ndef get_init_inputs():\n    return []\n")


def solution_source(expr: Expression, *, masked: bool) -> str:
    """A correct Triton solution: bounds-masked (any ``n``) or unmasked (``n`` a multiple of BLOCK only)."""
    ptrs = ", ".join(f"{name}_ptr" for name in expr.inputs)
    mask = ", mask=m" if masked else ""
    loads = "".join(f"    {name} = tl.load({name}_ptr + i{mask})\n" for name in expr.inputs)
    grid = f"triton.cdiv(n, {BLOCK})" if masked else f"n // {BLOCK}"
    return (
        "import torch\nimport triton\nimport triton.language as tl\n\n\n"
        f"@triton.jit\ndef kernel({ptrs}, out_ptr, n, BLOCK: tl.constexpr):\n"
        "    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)\n"
        + ("    m = i < n\n" if masked else "")
        + loads
        + f"    tl.store(out_ptr + i, {expr.triton}{mask})\n\n\n"
        f"class ModelNew(torch.nn.Module):\n    def forward(self, {', '.join(expr.inputs)}):\n"
        f"        out = torch.empty_like({expr.inputs[0]})\n        n = out.numel()\n"
        f"        kernel[({grid},)]({', '.join(expr.inputs)}, out, n, BLOCK={BLOCK})\n        return out\n"
    )


def _ragged(rng: random.Random) -> int:
    while True:
        n = rng.randint(300, 2000)
        if n % BLOCK:
            return n


def _demo(expr: Expression, n: int, masked: bool, instructions: str) -> dict[str, Any]:
    reply = f"```python\n{solution_source(expr, masked=masked)}```"
    return {"messages": [{"role": "user", "content": prompt_text(problem_source(expr, n), instructions)},
                         {"role": "assistant", "content": reply}]}


def write_templates(out: Path, *, n_train: int, n_eval: int, n_demos: int, masked_fraction: float, seed: int,
                    instructions: str = SHORT_INSTRUCTIONS) -> None:
    """Write problems/{train,eval}, sft.jsonl and corpus.jsonl into ``out`` (see the module docstring)."""
    rng = random.Random(seed)
    exprs = make_expressions(rng, n_train + n_eval + n_demos)
    held_train, held_eval, demo_exprs = exprs[:n_train], exprs[n_train:n_train + n_eval], exprs[n_train + n_eval:]
    for split, chosen in (("train", held_train), ("eval", held_eval)):
        folder = out / "problems" / split
        folder.mkdir(parents=True, exist_ok=True)
        for i, expr in enumerate(chosen):
            (folder / f"{split}_{i:04d}.py").write_text(problem_source(expr, _ragged(rng)))
    demos = [_demo(e, BLOCK * rng.randint(1, 8), rng.random() < masked_fraction, instructions) for e in demo_exprs]
    (out / "sft.jsonl").write_text("".join(json.dumps(d) + "\n" for d in demos))
    corpus = [m["content"] for d in demos for m in d["messages"]]
    (out / "corpus.jsonl").write_text("".join(json.dumps(t) + "\n" for t in corpus))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--train", type=int, default=400, help="held-out expressions for RL")
    p.add_argument("--eval", type=int, default=32, help="held-out expressions for evaluation")
    p.add_argument("--demos", type=int, default=2000, help="SFT demonstrations (other expressions)")
    p.add_argument("--masked-fraction", type=float, default=0.25, help="demonstrations in the bounds-masked style")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    write_templates(a.out, n_train=a.train, n_eval=a.eval, n_demos=a.demos, masked_fraction=a.masked_fraction,
                    seed=a.seed)


if __name__ == "__main__":
    main()
