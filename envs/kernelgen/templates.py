"""Generated elementwise problems and template Triton solutions: the data of the CPU warm-up.

``python -m envs.kernelgen.templates --out DIR`` writes, deterministically from ``--seed``:

* ``problems/train/*.py`` and ``problems/eval/*.py``: KernelBench-style problems over ten elementwise ops
  (:data:`OPS`: ``exp, abs, sin, cos, sigmoid, relu`` of ``x``; ``x + y, x * y, x - y, maximum(x, y)``) at
  sizes that are *not* multiples of the kernel's block, none of them seen in the warm-up (turn them into tasks
  with :mod:`envs.kernelgen.dataset`);
* ``sft.jsonl``: chat demonstrations ``{"messages": [user prompt, assistant solution]}`` of the same ops at
  sizes that *are* block multiples;
* ``corpus.jsonl``: the demonstrations' text, one JSON string per line, to train a tokenizer on
  (``agentrl model init --corpus``).

Every demonstration is a correct solution, in one of two styles: the general one (an ``m = i < n``
bounds mask on every load and store, grid ``triton.cdiv(n, BLOCK)``) in ``--masked-fraction`` of them, and
otherwise the style that is right only when ``n`` is a block multiple (no mask, grid ``n // BLOCK``). On the
demonstrations' sizes both are correct; on the held-out sizes only the masked one is (the other leaves the
tail unwritten, which the evaluation reports as a mismatch). A model warmed up on these mostly writes the
narrow style; RL on the held-out problems has to make the bounds mask the habit — the lesson every Triton
programmer learns first. (Held out here are problems and sizes, not ops: a 2-layer model does not learn to
copy unseen expressions from the prompt within a CPU warm-up — 250 SFT steps of a 4-layer model on random
expression trees copied none of 24 held-out ones.)
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from envs.kernelgen.dataset import SHORT_INSTRUCTIONS, prompt_text

__all__ = ["OPS", "Expression", "problem_source", "solution_source", "write_templates"]

BLOCK = 256


@dataclass(frozen=True, slots=True)
class Expression:
    """An elementwise expression over the inputs, written once for torch and once for triton.language."""

    torch: str
    triton: str
    inputs: tuple[str, ...]


OPS = (
    *(Expression(f"torch.{f}(x)", f"tl.{f}(x)", ("x",)) for f in ("exp", "abs", "sin", "cos", "sigmoid")),
    Expression("torch.relu(x)", "tl.maximum(x, 0.0)", ("x",)),
    *(Expression(f"x {op} y", f"x {op} y", ("x", "y")) for op in "+*-"),
    Expression("torch.maximum(x, y)", "tl.maximum(x, y)", ("x", "y")),
)


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
        n = rng.randint(300, 3000)
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
    seen: set[tuple[int, int]] = set()
    for split, count in (("eval", n_eval), ("train", n_train)):
        folder = out / "problems" / split
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            op = i % len(OPS)  # every op equally often
            while (key := (op, _ragged(rng))) in seen:
                pass
            seen.add(key)
            (folder / f"{split}_{i:04d}.py").write_text(problem_source(OPS[op], key[1]))
    demos = [_demo(rng.choice(OPS), BLOCK * rng.randint(1, 12), rng.random() < masked_fraction, instructions)
             for _ in range(n_demos)]
    (out / "sft.jsonl").write_text("".join(json.dumps(d) + "\n" for d in demos))
    corpus = [m["content"] for d in demos for m in d["messages"]]
    (out / "corpus.jsonl").write_text("".join(json.dumps(t) + "\n" for t in corpus))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--train", type=int, default=400, help="RL problems (ragged sizes)")
    p.add_argument("--eval", type=int, default=30, help="held-out evaluation problems (ragged sizes)")
    p.add_argument("--demos", type=int, default=1600, help="SFT demonstrations (block-multiple sizes)")
    p.add_argument("--masked-fraction", type=float, default=0.25, help="demonstrations in the bounds-masked style")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    write_templates(a.out, n_train=a.train, n_eval=a.eval, n_demos=a.demos, masked_fraction=a.masked_fraction,
                    seed=a.seed)


if __name__ == "__main__":
    main()
