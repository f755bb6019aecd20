"""The dataset step: a directory of problems to a task JSONL the controller reads.

``python -m envs.kernelgen.dataset --problems DIR [--problems DIR ...] --out tasks.jsonl`` writes one row
per problem: ``prompt`` (one user message: the instructions and the reference module), ``env`` (default
``kernelgen``), ``env_args`` (the reference source, its name and its settings, for
:class:`~envs.kernelgen.env.KernelEnv`), ``label`` (the problem's name) and ``group`` (its directory).
``DIR`` is any KernelBench-layout directory, e.g. a local checkout's ``KernelBench/level1``, or the
shipped ``envs/kernelgen/problems``. A config's ``launch.steps`` can run it before training.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from envs.kernelgen.problem import Problem, load_problems

__all__ = ["FULL_INSTRUCTIONS", "SHORT_INSTRUCTIONS", "prompt_text", "task_row", "write_tasks"]

FULL_INSTRUCTIONS = (
    "You are given a PyTorch reference module. Write a replacement named ModelNew, with the same constructor and "
    "forward signature, whose forward computes the same outputs with custom Triton kernels (@triton.jit functions "
    "launched from forward). Do not call the reference Model or the PyTorch operators you are replacing; keep "
    "inputs unchanged. Reply with the complete Python module in one ```python code block. After each attempt you "
    "will see how it was evaluated (errors, mismatches or timing) and may try again."
)
SHORT_INSTRUCTIONS = "Write ModelNew with Triton kernels."


def prompt_text(source: str, instructions: str = FULL_INSTRUCTIONS) -> str:
    """The user message of a task: instructions, then the reference module in a code block."""
    return f"{instructions}\n```python\n{source.strip()}\n```"


def task_row(problem: Problem, *, env: str = "kernelgen", instructions: str = FULL_INSTRUCTIONS,
             max_turns: int | None = None) -> dict[str, Any]:
    """One task row; ``max_turns`` (copied into the task's metadata) overrides the kernel agent's default."""
    row = {"prompt": [{"role": "user", "content": prompt_text(problem.source, instructions)}], "env": env,
           "env_args": problem.env_args(), "label": problem.name, "group": problem.group}
    return row if max_turns is None else {**row, "max_turns": max_turns}


def write_tasks(directories: list[Path], out: Path, *, env: str = "kernelgen", instructions: str = FULL_INSTRUCTIONS,
                max_turns: int | None = None) -> int:
    """Write one task row per problem of ``directories`` into ``out``; returns the number of rows."""
    problems = [p for d in directories for p in load_problems(d)]
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = (task_row(p, env=env, instructions=instructions, max_turns=max_turns) for p in problems)
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return len(problems)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problems", required=True, type=Path, action="append", help="a problem directory (repeatable)")
    p.add_argument("--out", required=True, type=Path, help="task JSONL to write")
    p.add_argument("--env", default="kernelgen", help="environment name the tasks name (worker/envd config key)")
    p.add_argument("--instructions", choices=["full", "short"], default="full",
                   help="full: for real code models; short: one line, for tiny models")
    p.add_argument("--max-turns", type=int, default=None, help="turns per episode (the kernel agent's default: 3)")
    a = p.parse_args(argv)
    text = FULL_INSTRUCTIONS if a.instructions == "full" else SHORT_INSTRUCTIONS
    n = write_tasks(a.problems, a.out, env=a.env, instructions=text, max_turns=a.max_turns)
    print(f"wrote {n} tasks to {a.out}")


if __name__ == "__main__":
    main()
