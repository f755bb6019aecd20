"""Kernel-evaluation throughput, and the hand-written solutions' verdicts and speedups.

Throughput (default): a mixed stream of solutions for the shipped problems that have hand-written ones —
correct, wrong (a changed constant), non-compiling (an undefined ``tl`` function) and crashing (an
unmasked store over a far too large grid) — evaluated through :class:`envs.kernelgen.pool.EvalSlots`, each
in its own sandboxed subprocess, at three concurrencies measured in the same run: 1 (sequential, the
baseline), 2 (TritonForge's default) and all slots (``--slots``; default: the CPU count on CPU, 8 per GPU on
CUDA). Prints evaluations per minute and the ratio against sequential. Timing is off in this mode (several
evaluations share a GPU), so it measures compile + correctness + anti-hacking checks.

``--handwritten``: every hand-written solution once, sequentially, with timing on CUDA (CUDA events;
speedup over eager PyTorch and over torch.compile of the reference).

    python -m bench.kernel_eval --device cpu --n 24
    python -m bench.kernel_eval --device cuda --n 48 --handwritten

(``-m`` from the repository root: run as a file, ``bench/inspect.py`` would shadow the standard library's
``inspect``.)
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import time
from collections import Counter
from pathlib import Path

from envs.kernelgen.evaluate import EvalConfig, EvalResult, evaluate_solution
from envs.kernelgen.pool import EvalSlots, visible_gpus
from envs.kernelgen.problem import Problem, load_problems

KG = Path(__file__).resolve().parents[1] / "envs" / "kernelgen"


def variants(source: str) -> dict[str, str]:
    """The four kinds of the mixed stream, made from one hand-written solution."""
    return {"correct": source, "wrong": _wrong(source), "no_compile": source.replace("tl.load(", "tl.no_such_load(", 1),
            "crash": _crash(source)}


def _wrong(source: str) -> str:
    """Same kernel with its first load wrapped in ``tl.abs``: it runs, but the values are wrong."""
    start = source.index("tl.load(")
    depth, end = 0, start
    for end in range(start + len("tl.load"), len(source)):
        depth += {"(": 1, ")": -1}.get(source[end], 0)
        if depth == 0:
            break
    return f"{source[:start]}tl.abs({source[start:end + 1]}){source[end + 1:]}"


def _crash(source: str) -> str:
    """Masks dropped and the grid made huge: stores far out of bounds (a segfault or an abort)."""
    return source.replace("mask=mask", "mask=None").replace("[(triton.cdiv(", "[(100000 * triton.cdiv(", 1)


def stream(problems: dict[str, Problem], n: int) -> list[tuple[str, Problem, str]]:
    sources = {p.stem: p.read_text() for p in sorted((KG / "solutions").glob("*.py"))}
    elementwise = [name for name in sources if "mask=mask" in sources[name] and "[(triton.cdiv(" in sources[name]]
    kinds = ["correct", "wrong", "no_compile", "crash"]
    items = []
    for i in range(n):
        kind = kinds[i % 4]
        name = (elementwise if kind == "crash" else list(sources))[i // 4 % (len(elementwise) if kind == "crash"
                                                                              else len(sources))]
        items.append((kind, problems[name], variants(sources[name])[kind]))
    return items


async def run_stream(items: list[tuple[str, Problem, str]], cfg: EvalConfig, slots: EvalSlots) -> tuple[float, Counter[str]]:
    outcomes: Counter[str] = Counter()

    async def one(kind: str, problem: Problem, source: str) -> None:
        async with slots.slot() as gpu:
            r = await evaluate_solution(problem.source, source, cfg, settings=problem.settings, seed=1, gpu=gpu)
        outcomes[f"{kind}->{r.outcome}"] += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(one(*item) for item in items))
    return time.perf_counter() - t0, outcomes


def slot_devices(device: str, count: int) -> list[str | None]:
    if device == "cpu":
        return [None] * count
    gpus = visible_gpus()
    return [gpus[i % len(gpus)] for i in range(count)]


async def throughput(args: argparse.Namespace, problems: dict[str, Problem]) -> None:
    cfg = EvalConfig(device=args.device, timing=False)
    items = stream(problems, args.n)
    full = args.slots or ((os.cpu_count() or 1) if args.device == "cpu" else 8 * len(visible_gpus()))
    print(f"device={args.device} evaluations={len(items)} (correct/wrong/no_compile/crash in turn)", flush=True)
    base = 0.0
    for label, count in (("sequential (baseline)", 1), ("2 at a time (TritonForge default)", 2),
                         (f"{full} slots (ours)", full)):  # each row as it is measured: a time limit keeps them
        seconds, outcomes = await run_stream(items, cfg, EvalSlots(slot_devices(args.device, count)))
        base = base or seconds
        print(f"  {label:36s} {60 * len(items) / seconds:7.1f} evals/min  {base / seconds:5.2f}x  ({seconds:.1f}s)  "
              f"outcomes {json.dumps(dict(sorted(outcomes.items())))}", flush=True)


async def handwritten(args: argparse.Namespace, problems: dict[str, Problem]) -> None:
    cfg = dataclasses.replace(EvalConfig(device=args.device), limits=dataclasses.replace(EvalConfig().limits,
                                                                                              wall_s=300.0, cpu_s=300))
    gpu = visible_gpus()[0] if args.device == "cuda" else None
    print(f"{'problem':18s} {'outcome':8s} {'sol ms':>9s} {'eager ms':>9s} {'compile ms':>10s} {'vs eager':>8s} "
          f"{'vs compile':>10s} {'eval s':>6s}")
    for path in sorted((KG / "solutions").glob("*.py")):
        if args.only and path.stem not in args.only:
            continue
        p = problems[path.stem]
        r: EvalResult = await evaluate_solution(p.source, path.read_text(), cfg, settings=p.settings, seed=3, gpu=gpu)
        t = r.timing or {}

        def ms(key: str, t: dict[str, object] = t) -> str:
            return f"{t[key]:.4f}" if isinstance(t.get(key), float) else "-"

        def x(v: float | None) -> str:
            return f"{v:.2f}x" if v else "-"

        print(f"{p.name:18s} {r.outcome:8s} {ms('solution_ms'):>9s} {ms('eager_ms'):>9s} {ms('compile_ms'):>10s} "
              f"{x(r.speedup_eager):>8s} {x(r.speedup_compile):>10s} {r.seconds:6.1f}"
              + (f"  {r.error[-200:]!r}" if r.outcome != "correct" else ""), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--n", type=int, default=24, help="evaluations in the mixed stream (a multiple of 4)")
    p.add_argument("--slots", type=int, default=None, help="concurrency of the last row")
    p.add_argument("--handwritten", action="store_true", help="the hand-written solutions, with timing on CUDA")
    p.add_argument("--only", nargs="*", default=None, help="with --handwritten: these problems only")
    p.add_argument("--skip-throughput", action="store_true")
    args = p.parse_args()
    problems = {pr.name: pr for pr in load_problems(KG / "problems")}
    if args.handwritten:
        asyncio.run(handwritten(args, problems))
    if not args.skip_throughput:
        asyncio.run(throughput(args, problems))


if __name__ == "__main__":
    main()
