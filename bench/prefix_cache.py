"""Radix prefix cache on a multi-turn tool workload: prefill tokens computed vs submitted, and the throughput
gain over the same engine with the cache off, in the same run.

The workload is what an agentic RL rollout sends: C conversations at once, each starting with the same
system prompt + tool descriptions (``--system`` tokens) and its own task (``--task`` tokens), then ``--turns``
turns of: generate ``--new`` tokens, append a tool result (``--tool`` tokens), resend the whole conversation.
Token ids are random (fixed seeds) and every generation runs exactly ``--new`` tokens (``ignore_eos``), so
both engines do the same work. Each engine is a real ``agentrl engine`` process; they run one after the other.

    python -m bench.prefix_cache                                            # CPU, small random model
    python -m bench.prefix_cache --shape qwen2.5-0.5b --device cuda --conversations 128 --system 1024 --turns 8
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import SHAPES, bench_model, launch_engine, model_arguments


def start(model: Path, args: argparse.Namespace, cache: bool, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    context = args.system + args.task + args.turns * (args.new + args.tool) + 64
    return launch_engine(model, [
        "--device", args.device, "--dtype", args.dtype, "--max-running", str(args.conversations),
        "--context-length", str(context), "--set", f"engine.prefix_cache={'true' if cache else 'false'}",
    ], log)


def ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(10, vocab) for _ in range(n)]


async def conversation(s: aiohttp.ClientSession, url: str, i: int, args: argparse.Namespace, vocab: int,
                       system: list[int]) -> tuple[int, int]:
    """Run one conversation; returns (prompt tokens submitted, output tokens)."""
    rng = random.Random(1000 + i)
    history = system + ids(rng, args.task, vocab)
    submitted = produced = 0
    for turn in range(args.turns):
        body = {"input_ids": history, "rid": f"c{i}-t{turn}", "sampling_params": {
            "max_new_tokens": args.new, "ignore_eos": True, "temperature": 1.0, "sampling_seed": i * 100 + turn}}
        async with s.post(url + "/generate", json=body) as r:
            out = await r.json()
        assert len(out["output_ids"]) == args.new, out
        submitted += len(history)
        produced += args.new
        history = history + out["output_ids"] + ids(rng, args.tool, vocab)
    return submitted, produced


async def stats(s: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with s.get(url + "/get_server_info") as r:
        return dict((await r.json())["internal_states"][0])


async def workload(url: str, args: argparse.Namespace, vocab: int) -> dict[str, float]:
    system = ids(random.Random(7), args.system, vocab)
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as s:
        await conversation(s, url, 10_000, argparse.Namespace(**{**vars(args), "turns": 1}), vocab, system)  # warm-up
        before = await stats(s, url)
        start = time.perf_counter()
        results = await asyncio.gather(*(conversation(s, url, i, args, vocab, system) for i in range(args.conversations)))
        wall = time.perf_counter() - start
        after = await stats(s, url)
    return {
        "wall": wall,
        "submitted": sum(r[0] for r in results),
        "computed": after["prefilled_tokens"] - before["prefilled_tokens"],
        "output": sum(r[1] for r in results),
        "prefill_s": after["prefill_time_s"] - before["prefill_time_s"],
        "decode_s": after["decode_time_s"] - before["decode_time_s"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(p)
    p.add_argument("--conversations", type=int, default=16)
    p.add_argument("--system", type=int, default=512, help="shared system prompt + tool descriptions (tokens)")
    p.add_argument("--task", type=int, default=48, help="per-conversation task (tokens)")
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--new", type=int, default=24, help="tokens generated per turn")
    p.add_argument("--tool", type=int, default=48, help="tool-result tokens appended per turn")
    args = p.parse_args()

    tmp, model = bench_model(args, "agentrl-bench-prefix-")
    vocab = min(SHAPES[args.shape].vocab_size, 50_000)
    runs: dict[bool, dict[str, float]] = {}
    for cache in (False, True):
        proc, url = start(model, args, cache, tmp / f"engine-{cache}.log")
        try:
            runs[cache] = asyncio.run(workload(url, args, vocab))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    print(f"model={model} shape={args.shape} device={args.device} conversations={args.conversations} "
          f"system={args.system} task={args.task} turns={args.turns} new={args.new} tool={args.tool} cpus={os.cpu_count()}")
    print(f"{'cache':>5} | {'wall s':>7} | {'prompt tok submitted':>20} | {'prefill tok computed':>20} | "
          f"{'computed/submitted':>18} | {'prefill s':>9} | {'output tok/s':>12} | {'speedup':>7}")
    for cache in (False, True):
        r = runs[cache]
        print(f"{'on' if cache else 'off':>5} | {r['wall']:7.2f} | {r['submitted']:20,d} | {int(r['computed']):20,d} | "
              f"{r['computed'] / r['submitted']:18.3f} | {r['prefill_s']:9.2f} | {r['output'] / r['wall']:12.1f} | "
              f"{runs[False]['wall'] / r['wall']:7.2f}")


if __name__ == "__main__":
    main()
