"""Timing for the benchmarks: device work of the kernel micro-benchmarks (``calls`` calls captured in one CUDA
graph), and one call on the wall clock."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["graph_time_ms", "wall_seconds"]


def graph_time_ms(fn: Callable[[], object], calls: int, iters: int, device: torch.device) -> float:
    """Median ms of ``calls`` calls of ``fn`` over ``iters`` timings: one CUDA graph replayed and timed with CUDA
    events (launch overhead does not count), or plain calls timed on the wall clock elsewhere."""
    fn()
    if device.type != "cuda":
        runs = []
        for _ in range(iters):
            began = time.perf_counter()
            for _ in range(calls):
                fn()
            runs.append((time.perf_counter() - began) * 1e3)
        return statistics.median(runs)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def wall_seconds(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes on the wall clock."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
