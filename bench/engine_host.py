"""The engine scheduler's host work per decode step, and how much of it overlap scheduling hides.

The real :class:`~agentrl.engine.scheduler.Scheduler` drives a runner whose decode step stands for a device:
it sleeps ``--device-ms`` (releasing the GIL, as a GPU computes while the host goes on) and returns small
logits. Everything else — the next step's inputs, sampling parameters, sampling, committing tokens, stop
checks, waking the requests — is the engine's own code. Same requests, same run: step by step
(``overlap=False``) vs overlapped; prints ms per decode step and the ratio.

    python -m bench.engine_host                       # 256 requests, 128 new tokens, 3 ms per device step
    python -m bench.engine_host --profile 15          # also the top host functions (cProfile, step by step)
    python -m bench.engine_host --sampling-params     # also: a step's sampling parameters, rebuilt vs reused
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from agentrl.engine.kv_cache import KVCache
from agentrl.engine.request import Request, RequestOptions
from agentrl.engine.runner import Prefill
from agentrl.engine.scheduler import Scheduler
from agentrl.engine.step_inputs import DecodeSampling, sampling_batch

VOCAB = 512


class DeviceStandIn:
    """A runner whose forward passes take ``device_s`` of wall time without holding the GIL."""

    def __init__(self, num_rows: int, device_s: float) -> None:
        self.num_rows, self.device_s = num_rows, device_s
        self.scratch = 100_000
        self.device = torch.device("cpu")
        self.logits = torch.randn(num_rows, VOCAB, generator=torch.Generator().manual_seed(0))

    def set_rows(self, rows: Sequence[int], indices: Sequence[Any]) -> None:
        pass

    def prefill(self, rows, chunks, starts, *, score=None) -> Prefill:  # type: ignore[no-untyped-def]
        time.sleep(self.device_s)
        return Prefill(self.logits[: len(rows)], {})

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int | None = None) -> torch.Tensor:
        time.sleep(self.device_s)
        return self.logits[: tokens.shape[0]]


class Chars:
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(97 + i % 26) for i in ids)


def requests(n: int, new_tokens: int) -> list[Request]:
    opts = {"temperature": 1.0, "max_new_tokens": new_tokens, "ignore_eos": True}
    return [Request(rid=f"r{i}", input_ids=list(range(1, 129)), options=RequestOptions(seed=i, **opts),  # type: ignore[arg-type]
                    return_logprob=True) for i in range(n)]


async def run(args: argparse.Namespace, *, overlap: bool) -> tuple[float, Scheduler]:
    runner = DeviceStandIn(args.concurrency, args.device_ms / 1000)
    pool = args.concurrency * (128 + args.new_tokens) + 16
    scheduler = Scheduler(runner, Chars(), [], KVCache(pool, enabled=False), max_running=args.concurrency,
                          max_queued=args.concurrency, overlap=overlap)
    reqs = requests(args.concurrency, args.new_tokens)
    scheduler.start()
    start = time.perf_counter()
    for r in reqs:
        scheduler.submit(r)
    for r in reqs:
        while not await r.updates.get():
            pass
    took = time.perf_counter() - start
    await scheduler.stop()
    assert all(len(r.output_ids) == args.new_tokens for r in reqs)
    return took / scheduler.stats.decode_steps, scheduler


def time_sampling_params(n: int, steps: int = 300) -> None:
    """A decode step's sampling parameters for ``n`` running requests: built from every request (before
    ``DecodeSampling``) vs the per-request columns reused, step indices new; interleaved rounds, best of each."""
    reqs, lags, cache = requests(n, 8), [1] * n, DecodeSampling(torch.device("cpu"))
    ways = {"rebuilt": lambda: sampling_batch(reqs, lags), "reused": lambda: cache.batch(reqs, lags)}
    best = dict.fromkeys(ways, float("inf"))
    for _ in range(5):
        for name, way in ways.items():
            start = time.perf_counter()
            for _ in range(steps):
                way()
            best[name] = min(best[name], (time.perf_counter() - start) / steps)
    print(f"  sampling parameters per step, C={n}: rebuilt {1e3 * best['rebuilt']:.3f} ms, reused "
          f"{1e3 * best['reused']:.3f} ms ({best['rebuilt'] / best['reused']:.2f}x)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--device-ms", type=float, default=3.0, help="wall time of one forward pass (the stand-in device)")
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs per mode")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="print the top N host functions")
    p.add_argument("--sampling-params", action="store_true",
                   help="also time a decode step's sampling parameters: built from every request vs reused")
    args = p.parse_args()
    torch.set_num_threads(1)
    best: dict[bool, tuple[float, float]] = {False: (float("inf"), 0.0), True: (float("inf"), 0.0)}
    for _ in range(args.repeats):  # interleaved, so both modes see the same machine load
        for overlap in (False, True):
            step_s, sched = asyncio.run(run(args, overlap=overlap))
            model_s = sched.stats.decode_time_s / sched.stats.decode_steps
            best[overlap] = min(best[overlap], (step_s, model_s))
    (sync_s, sync_model), (overlap_s, overlap_model) = best[False], best[True]
    print(f"C={args.concurrency}, {args.new_tokens} new tokens, device step {args.device_ms:.2f} ms (stand-in)")
    for name, step_s, model_s in (("step by step", sync_s, sync_model), ("overlapped", overlap_s, overlap_model)):
        print(f"  {name:13s} {1000 * step_s:.2f} ms/step wall, {1000 * model_s:.2f} ms on the model thread "
              f"(device stand-in + sampling + inputs), {1000 * (step_s - model_s):.2f} ms beyond it")
    print(f"  overlapped {sched.stats.overlapped_steps} of {sched.stats.decode_steps} steps; "
          f"speedup {sync_s / overlap_s:.2f}x (bound if the host work hid fully: {sync_s / max(sync_model, sync_s - sync_model):.2f}x)")
    if args.sampling_params:
        time_sampling_params(args.concurrency)
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        asyncio.run(run(args, overlap=False))
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.profile)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
