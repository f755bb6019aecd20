"""Chunked prefill: how long the running requests stall while long prompts arrive, with and without pieces.

An agentic rollout keeps many short generations decoding while long transcripts (a whole multi-turn history)
arrive for their next turn. Prefilled in one pass, a long prompt stops every running request for the whole pass;
fed a piece per scheduler iteration (``--chunked-prefill-size``), the running requests decode between pieces.
Same engine, same workload, one run each, in this process's run (real ``agentrl engine`` processes):

- ``--decoders`` streaming requests decode ``--decode-tokens`` tokens each (``ignore_eos``), and while they run,
  ``--long`` prompts of ``--long-len`` random tokens arrive one after the other (each generating 1 token);
- per setting: the decoders' largest and 99th-percentile gap between two streamed tokens while the long prompts
  were prefilled, the decoders' output tokens/s, and the long prompts' mean time to their token.

    python -m bench.chunked_prefill                                              # CPU, small random model
    python -m bench.chunked_prefill --shape qwen2.5-0.5b --device cuda --dtype bfloat16 --long-len 32768 \\
        --piece 4096 --decoders 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import SHAPES, bench_model, launch_engine, model_arguments


async def decoder(s: aiohttp.ClientSession, url: str, i: int, args: argparse.Namespace, vocab: int) -> list[float]:
    """One streaming generation; the arrival time of each streamed token."""
    rng = random.Random(i)
    body = {"input_ids": [rng.randrange(10, vocab) for _ in range(16)], "stream": True,
            "sampling_params": {"max_new_tokens": args.decode_tokens, "ignore_eos": True, "temperature": 1.0}}
    times = []
    async with s.post(url + "/generate", json=body) as r:
        async for line in r.content:
            if line.startswith(b"data:") and b"[DONE]" not in line:
                json.loads(line[5:])
                times.append(time.perf_counter())
    return times


async def long_prompts(s: aiohttp.ClientSession, url: str, args: argparse.Namespace, vocab: int) -> list[tuple[float, float]]:
    """The long prompts, one after the other: (sent, answered) per prompt."""
    spans = []
    for k in range(args.long):
        rng = random.Random(10_000 + k)
        body = {"input_ids": [rng.randrange(10, vocab) for _ in range(args.long_len)],
                "sampling_params": {"max_new_tokens": 1, "ignore_eos": True}}
        sent = time.perf_counter()
        async with s.post(url + "/generate", json=body) as r:
            out = await r.json()
        assert len(out["output_ids"]) == 1, out
        spans.append((sent, time.perf_counter()))
    return spans


async def workload(url: str, args: argparse.Namespace, vocab: int) -> dict[str, float]:
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as s:
        await long_prompts(s, url, argparse.Namespace(**{**vars(args), "long": 1}), vocab)  # warm-up: shapes, graphs
        decoders = [asyncio.ensure_future(decoder(s, url, i, args, vocab)) for i in range(args.decoders)]
        await asyncio.sleep(args.lead)  # the decoders are running
        spans = await long_prompts(s, url, args, vocab)
        streams = await asyncio.gather(*decoders)
    begin, end = spans[0][0], spans[-1][1]
    gaps = np.concatenate([np.diff([t for t in ts if begin <= t <= end]) for ts in streams] + [np.zeros(0)])
    window = [t for ts in streams for t in ts if begin <= t <= end]
    return {"max_gap_ms": 1e3 * float(gaps.max(initial=0.0)), "p99_gap_ms": 1e3 * float(np.percentile(gaps, 99)),
            "decode_tok_s": len(window) / (end - begin), "long_ms": 1e3 * float(np.mean([b - a for a, b in spans]))}


def run(model: Path, args: argparse.Namespace, piece: int, log: Path, vocab: int) -> dict[str, float]:
    proc, url = launch_engine(model, [
        "--device", args.device, "--dtype", args.dtype, "--max-running", str(args.decoders + 1),
        "--context-length", str(args.long_len + 64), "--chunked-prefill-size", str(piece),
        "--set", "engine.prefix_cache=false"], log)
    try:
        return asyncio.run(workload(url, args, vocab))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(p)
    p.add_argument("--decoders", type=int, default=8)
    p.add_argument("--decode-tokens", type=int, default=400)
    p.add_argument("--long", type=int, default=3, help="long prompts, one after the other")
    p.add_argument("--long-len", type=int, default=4096)
    p.add_argument("--piece", type=int, default=512, help="--chunked-prefill-size of the chunked run")
    p.add_argument("--lead", type=float, default=1.0, help="seconds the decoders run before the long prompts")
    args = p.parse_args()

    tmp, model = bench_model(args, "agentrl-bench-chunked-")
    vocab = min(SHAPES[args.shape].vocab_size, 50_000)
    runs: dict[str, dict[str, Any]] = {
        "one pass": run(model, args, args.long_len, tmp / "engine-whole.log", vocab),
        f"pieces of {args.piece}": run(model, args, args.piece, tmp / "engine-pieces.log", vocab),
    }
    print(f"shape={args.shape} device={args.device} dtype={args.dtype} decoders={args.decoders} "
          f"long prompts={args.long} x {args.long_len} tokens")
    print("| prefill | decoders' max gap (ms) | p99 gap (ms) | decoders' tok/s | long prompt's time to token (ms) |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in runs.items():
        print(f"| {name} | {r['max_gap_ms']:.0f} | {r['p99_gap_ms']:.0f} | {r['decode_tok_s']:.0f} | {r['long_ms']:.0f} |")
    whole, pieces = runs.values()
    print(f"max gap one pass / pieces: {whole['max_gap_ms'] / pieces['max_gap_ms']:.2f}x; decoders' tok/s pieces / "
          f"one pass: {pieces['decode_tok_s'] / whole['decode_tok_s']:.2f}x; long prompt's time pieces / one pass: "
          f"{pieces['long_ms'] / whole['long_ms']:.2f}x")


if __name__ == "__main__":
    main()
