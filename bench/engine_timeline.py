"""Where a serving engine's decode step goes between the device and the host: device busy vs idle per step, and
every host sync the engine's own code makes while decoding.

The engine is built in process as ``agentrl engine`` builds it (runner, CUDA graphs, scheduler) on a random
model of ``--shape``; C requests of ``--prompt-len`` random tokens and ``--new-tokens`` each run together
(temperature 1, ``ignore_eos``) once to warm up, then once measured. During the measured round:

- each step handed to the model thread records a CUDA event before and after its work (on the stream it
  launches on). ``device span`` is the time between a step's two events on the device's clock; ``gap`` is the
  time from one step's end to the next one's start, where the device had nothing of the engine's queued: host
  time the overlap did not hide. span + gap over the steps is the round's device time line.
- ``--served``: the engine's HTTP app serves the rounds, sent by a client in another process (as
  ``bench.engine`` does), so the event loop also runs the server and the GIL is shared as in production;
- ``torch.cuda.set_sync_debug_mode("warn")`` flags every synchronizing CUDA call (``.item()``, ``.tolist()``
  of a device tensor, pageable copies, ...); each is counted by the engine source line that made it.

    python -m bench.engine_timeline --device cuda                 # 0.5B shape, C=256, 128 + 256 tokens
    python -m bench.engine_timeline --device cuda --concurrency 512 --no-overlap
    python -m bench.engine_timeline --device cuda --profile 15    # also the top functions of each thread

``--profile N`` runs cProfile on the model thread (inside each step) and on the event loop during the measured
round and prints each one's top N functions by own time: a call that blocks on the device stands out there.
From Python 3.12 cProfile runs on ``sys.monitoring``, one profiler per process that sees every thread: there one
profile of the measured round covers both threads together.

On CPU (a small model) it runs so it cannot rot; there are no device events and no CUDA syncs to flag.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import cProfile
import functools
import itertools
import pstats
import socket
import sys
import tempfile
import time
import traceback
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import torch
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agentrl.config.engine import EngineConfig
from agentrl.engine.build import build_server
from agentrl.engine.request import Request, RequestOptions
from agentrl.engine.server import EngineServer
from agentrl.engine.tiny import init_model
from bench.engine import SHAPES, client_session, prompts, timed_round


class Timeline:
    """CUDA events around every step the scheduler hands to its model thread, its host time, and its kind
    (``kind`` is what the scheduler is doing when it hands the step over: "decode", or "prefill")."""

    def __init__(self, cuda: bool, profile: cProfile.Profile | None = None) -> None:
        self.cuda, self.on, self.profile, self.kind = cuda, False, profile, "decode"
        self.steps: list[tuple[str, float, Any, Any]] = []  # kind, host seconds, begin and end events

    def wrap(self, step: Callable[[], Any]) -> Callable[[], Any]:
        kind = self.kind

        def timed() -> Any:
            if not self.on:
                return step()
            start = time.perf_counter()
            begin = end = None
            if self.cuda:
                begin = torch.cuda.Event(enable_timing=True)
                begin.record()
            # the model thread's own calls (a profiler is per thread)
            out = self.profile.runcall(step) if self.profile is not None else step()
            if self.cuda:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
            self.steps.append((kind, time.perf_counter() - start, begin, end))
            return out

        return timed

    def summary(self, kind: str) -> dict[str, float]:
        steps = [s for s in self.steps if s[0] == kind]
        out = {"steps": float(len(steps)), "host_ms": 1000 * sum(s[1] for s in steps) / max(len(steps), 1)}
        if self.cuda and steps:
            torch.cuda.synchronize()
            spans = [b.elapsed_time(e) for _, _, b, e in steps]
            # idle between consecutive steps of this kind handed over one after the other
            order = {id(s): i for i, s in enumerate(self.steps)}
            gaps = [max(a[3].elapsed_time(b[2]), 0.0) for a, b in itertools.pairwise(steps)
                    if order[id(b)] == order[id(a)] + 1]
            out.update(span_ms=sum(spans) / len(spans), total_ms=sum(spans),
                       gap_ms=sum(gaps) / max(len(gaps), 1))
        return out


class SyncSites:
    """Counts CUDA sync warnings by the innermost agentrl source line that triggered them."""

    def __init__(self) -> None:
        self.sites: collections.Counter[str] = collections.Counter()

    def __enter__(self) -> SyncSites:
        self._show = warnings.showwarning
        warnings.showwarning = self._record  # type: ignore[assignment]
        warnings.simplefilter("always")
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc: object) -> None:
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = self._show

    def _record(self, message: Any, category: Any, filename: str, lineno: int, *rest: Any) -> None:
        if "synchroniz" not in str(message):
            return
        ours = [f for f in traceback.extract_stack() if "/agentrl/" in f.filename]
        site = f"{Path(ours[-1].filename).name}:{ours[-1].lineno} {ours[-1].line}" if ours else f"{filename}:{lineno}"
        self.sites[site] += 1


async def one_round(server: EngineServer, batch: list[list[int]], new_tokens: int) -> float:
    opts = RequestOptions(max_new_tokens=new_tokens, ignore_eos=True, temperature=1.0)
    reqs = [Request(rid=uuid.uuid4().hex, input_ids=list(ids), options=opts) for ids in batch]
    start = time.perf_counter()
    await server.run_all(reqs)
    assert all(len(r.output_ids) == new_tokens for r in reqs)
    return time.perf_counter() - start


async def measure(server: EngineServer, batch: list[list[int]], new_tokens: int, timeline: Timeline,
                  sites: SyncSites, loop_profile: cProfile.Profile | None,
                  client: list[str] | None = None) -> tuple[float, int]:
    scheduler = server.scheduler
    submit, prefill = scheduler._submit, scheduler._prefill
    scheduler._submit = lambda step: submit(timeline.wrap(step))  # type: ignore[method-assign]

    async def prefill_marked(reqs: list[Request]) -> None:
        timeline.kind = "prefill"
        try:
            await prefill(reqs)
        finally:
            timeline.kind = "decode"

    scheduler._prefill = prefill_marked  # type: ignore[method-assign]
    async with rounds(server, client) as run_round:
        await run_round(batch, new_tokens)  # warm-up: graphs, kernels, allocator
        before = scheduler.stats.decode_steps
        timeline.on = True
        with sites:
            if loop_profile is not None:
                loop_profile.enable()
            took = await run_round(batch, new_tokens)
            if loop_profile is not None:
                loop_profile.disable()
        timeline.on = False
        return took, scheduler.stats.decode_steps - before


@contextlib.asynccontextmanager
async def rounds(server: EngineServer, client: list[str] | None) -> AsyncIterator[Callable[..., Awaitable[float]]]:
    """How a round runs: in process (``client`` None), or sent over HTTP to the engine's app on a free port by a
    client process (``client``: its argv, to which the URL is appended)."""
    if client is None:
        server.scheduler.start()
        try:
            yield functools.partial(one_round, server)
        finally:
            await server.scheduler.stop()
        return
    runner = web.AppRunner(server.app(), access_log=None, handler_cancellation=True)
    await runner.setup()  # its startup starts the scheduler
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    await web.TCPSite(runner, "127.0.0.1", port).start()

    async def over_http(batch: list[list[int]], new_tokens: int) -> float:
        proc = await asyncio.create_subprocess_exec(*client, f"http://127.0.0.1:{port}",
                                                    stdout=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"the client process exited with {proc.returncode}")
        return float(out.decode().split()[-1])

    try:
        yield over_http
    finally:
        await runner.cleanup()


async def client_round(url: str, batch: list[list[int]], new_tokens: int) -> float:
    """``--client``: send one round to ``url`` at once; prints (and returns) its seconds."""
    async with client_session() as s:
        took = await timed_round(s, url, batch, new_tokens)
    print(f"{took:.6f}", flush=True)
    return took


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None, help="qwen2.5-0.5b on CUDA, small on CPU")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--concurrency", type=int, default=None, help="256 on CUDA, 16 on CPU")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=None, help="256 on CUDA, 16 on CPU")
    p.add_argument("--no-overlap", action="store_true")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="top N functions of each thread (cProfile)")
    p.add_argument("--served", action="store_true", help="rounds over HTTP from a client process")
    p.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)  # the client process of --served
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    shape = args.shape or ("qwen2.5-0.5b" if cuda else "small")
    c, new = args.concurrency or (256 if cuda else 16), args.new_tokens or (256 if cuda else 16)
    batch = prompts(c, args.prompt_len, min(SHAPES[shape].vocab_size, 50_000), seed=c)
    if args.client:
        asyncio.run(client_round(args.client, batch, new))
        return
    client = [sys.executable, "-m", "bench.engine_timeline", "--shape", shape, "--concurrency", str(c),
              "--prompt-len", str(args.prompt_len), "--new-tokens", str(new), "--client"] if args.served else None
    model = init_model(Path(tempfile.mkdtemp(prefix="agentrl-timeline-")) / "model", SHAPES[shape])
    cfg = {"model": str(model), "device": args.device, "dtype": args.dtype, "max_running": c,
           "context_length": max(args.prompt_len + new + 8, 128), "prefix_cache": False,
           "overlap_schedule": not args.no_overlap, "freeze_gc": False}
    server = build_server(msgspec.convert(cfg, EngineConfig))
    profiles = profilers(args.profile > 0)
    timeline, sites = Timeline(cuda, profiles[0]), SyncSites()
    took, steps = asyncio.run(measure(server, batch, new, timeline, sites, profiles[1], client))
    d, pre = timeline.summary("decode"), timeline.summary("prefill")
    print(f"shape={shape} device={args.device} C={c} prompt={args.prompt_len} new={new} "
          f"overlap={not args.no_overlap} {'served over HTTP' if args.served else 'in process'}")
    print(f"round: {c * new / took:,.0f} tok/s, {1000 * took / max(steps, 1):.2f} ms wall per decode step "
          f"({steps} decode steps, {int(pre['steps'])} prefill steps)")
    print(f"model thread: {d['host_ms']:.2f} ms host time per decode step, {pre['host_ms']:.2f} ms per prefill step")
    if "span_ms" in d:
        per = d["span_ms"] + d["gap_ms"]
        print(f"device: {d['span_ms']:.2f} ms span + {d['gap_ms']:.2f} ms idle gap per decode step "
              f"(idle {d['gap_ms'] / per:.0%}); prefill {pre.get('total_ms', 0.0):.1f} ms in all "
              f"({1000 * took:.0f} ms round)")
    total = sum(sites.sites.values())
    print(f"host syncs flagged while measuring: {total} ({total / max(steps, 1):.2f} per decode step)")
    for site, n in sites.sites.most_common(12):
        print(f"  {n:>6}  {site}")
    names = ("model thread", "event loop") if PER_THREAD_PROFILES else ("", "model thread and event loop")
    for name, prof in zip(names, profiles, strict=True):
        if prof is not None:
            print(f"--- {name}: top {args.profile} functions by own time over the measured round")
            pstats.Stats(prof).sort_stats("tottime").print_stats(args.profile)


PER_THREAD_PROFILES = sys.version_info < (3, 12)  # 3.12+: cProfile is process-wide (sys.monitoring)


def profilers(on: bool) -> tuple[cProfile.Profile | None, cProfile.Profile | None]:
    """The model thread's profiler and the event loop's (before 3.12), or one for the whole round."""
    if not on:
        return None, None
    return (cProfile.Profile(), cProfile.Profile()) if PER_THREAD_PROFILES else (None, cProfile.Profile())


if __name__ == "__main__":
    main()
