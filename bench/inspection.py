"""Inspection under load: ``tail --json`` throughput, viewer latency while trajectories stream at >= 1,000/s,
and the learner's step time with and without a viewer attached.

Every number is measured in this run against a baseline measured in this run:

1. **tail --json, draining a stored stream**: ``agentrl tail RUN --json --no-follow`` (a subprocess, output to
   /dev/null) over N stored trajectories, against a bare nats-py ordered consumer that reads the same
   messages without decoding them (the bus's ceiling). Startup (imports, connect) is measured by a run with
   ``--from end`` and subtracted.
2. **live, >= 1,000 trajectories/s**: a publisher process streams trajectories at ``--rate``; ``agentrl tail
   --json --follow`` must keep up (lines/s against published/s, and lag from the stream's timestamp to the
   line's arrival); ``agentrl inspect`` serves two pages in headless chromium, one following the whole
   stream, one filtered to marker trajectories the publisher sends twice a second: latency from publish to
   the row being in the page's DOM (a MutationObserver in the page stamps it).
3. **learner step time**: ``agentrl learner`` on a tiny model trains on the stream; mean wall time per step
   with the publisher alone, then with the publisher, the viewer (two browser pages) and ``tail --follow``.

    python bench/inspection.py                       # about 3 minutes on 2 CPU cores
    python bench/inspection.py --rate 2000 --seconds 20
"""


from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agentrl.bus import Bus, EmbeddedNats, free_port
from agentrl.config import dump_config
from agentrl.config.run import RunConfig
from agentrl.inspect.synthetic import synthetic_group
from agentrl.messages import encode

PY = sys.executable
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


# ---------------------------------------------------------------- data


def make_payloads(n: int, encode_text: Any, seed: int = 0) -> list[tuple[str, bytes]]:
    """``n`` encoded trajectories (groups of 4, one resumed task in five groups), with their ids."""
    rng = random.Random(seed)
    out: list[tuple[str, bytes]] = []
    g = 0
    while len(out) < n:
        for t in synthetic_group(rng, version=0, resumed=1 if g % 5 == 0 else 0, encode=encode_text):
            out.append((t.id, encode(t)))
        g += 1
    return out[:n]


def tiny_model(root: Path) -> Path:
    from agentrl.engine.tiny import TinyModelSpec, init_model

    return init_model(root / "model", TinyModelSpec())


# ---------------------------------------------------------------- publisher process


async def publish_at_rate(url: str, run: str, rate: float, seconds: float, model: str) -> None:
    """Publish trajectories at ``rate``/s for ``seconds``; every 0.5 s a marker, printed as 'marker ID TIME'."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    payloads = make_payloads(int(rate * seconds) + 8, lambda s: tok.encode(s, add_special_tokens=False), seed=1)
    marker_rng = random.Random(2)
    async with await Bus.connect(url, run, ensure=False) as bus:
        start, sent, markers = time.monotonic(), 0, 0
        tick = 0.02
        while sent < len(payloads) and time.monotonic() - start < seconds:
            due = min(len(payloads), int((time.monotonic() - start + tick) * rate))
            batch = payloads[sent:due]
            for msg_id, payload in batch:  # core publishes into the stream's subject: stored without a round trip
                await bus.nc.publish(bus.subjects.traj, payload, headers={"Nats-Msg-Id": msg_id})
            if batch:
                await bus.nc.flush()
                sent = due
            if time.monotonic() - start >= 0.5 * (markers + 1):
                marker = synthetic_group(marker_rng, group_size=1, version=0)[0]
                marker.id = marker.task_id = f"marker-{markers}"
                t0 = time.time()
                await bus.publish(bus.subjects.traj, marker, msg_id=marker.id)
                print(f"marker {marker.id} {t0:.6f}", flush=True)
                markers += 1
            await asyncio.sleep(max(0.0, start + (sent / rate) - time.monotonic()))
        print(f"published {sent} in {time.monotonic() - start:.2f}s", flush=True)


# ---------------------------------------------------------------- helpers


@contextlib.contextmanager
def process(*argv: str, stdout: Any = subprocess.DEVNULL) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(list(argv), stdout=stdout, stderr=subprocess.DEVNULL, env=ENV)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def timed(*argv: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(list(argv), stdout=subprocess.DEVNULL, check=True, env=ENV)
    return time.perf_counter() - t0


async def raw_drain(url: str, run: str, n: int) -> float:
    """Seconds for a bare ordered consumer to receive ``n`` messages (no decode): the ceiling."""
    import nats

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        t0 = time.perf_counter()
        sub = await js.subscribe(f"agentrl.{run}.traj", ordered_consumer=True)
        for _ in range(n):
            await sub.next_msg(timeout=10)
        elapsed = time.perf_counter() - t0
        await sub.unsubscribe()
        return elapsed
    finally:
        await nc.close()


def make_run_dir(root: Path, name: str, model: Path) -> Path:
    run_dir = root / "runs" / name
    cfg = RunConfig(name=name, dir=str(run_dir))
    cfg.engine.model = str(model)
    dump_config(cfg, run_dir / "config.yaml")
    return run_dir


# ---------------------------------------------------------------- 1. tail drain


async def bench_drain(root: Path, model: Path, n: int) -> dict[str, float]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    payloads = make_payloads(n, lambda s: tok.encode(s, add_special_tokens=False))
    run_dir = make_run_dir(root, "drain", model)
    async with EmbeddedNats(run_dir / "nats") as server:
        async with await Bus.connect(server.url, "drain") as bus:
            await bus.publish_many(bus.subjects.traj, [p for _, p in payloads], msg_ids=[i for i, _ in payloads])
        raw = await raw_drain(server.url, "drain", n)
        tail = [PY, "-m", "agentrl.cli", "tail", "drain", "--nats", server.url, "--no-follow"]
        startup = min([await asyncio.to_thread(timed, *tail, "--from", "end") for _ in range(2)])
        total = await asyncio.to_thread(timed, *tail, "--json")
        lines = await asyncio.to_thread(timed, *tail)
    mean_bytes = statistics.fmean(len(p) for _, p in payloads)
    return {"n": n, "bytes_per_traj": mean_bytes, "raw_per_s": n / raw, "startup_s": startup,
            "json_per_s": n / max(total - startup, 1e-9), "line_per_s": n / max(lines - startup, 1e-9)}


# ---------------------------------------------------------------- 2. live: tail follow and the viewer


OBSERVER = """() => {
  window.__seen = {};
  const stamp = () => { for (const r of document.querySelectorAll('.row[data-id]')) {
    if (!(r.dataset.id in window.__seen)) window.__seen[r.dataset.id] = Date.now() / 1000; } };
  new MutationObserver(stamp).observe(document.querySelector('#rows'), {childList: true, subtree: true});
  stamp();
}"""


@contextlib.asynccontextmanager
async def browser_pages(url: str, n: int) -> AsyncIterator[list[Any]]:
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_FLAGS)
        try:
            pages = []
            for _ in range(n):
                page = await browser.new_page(viewport={"width": 1300, "height": 820})
                pages.append(page)
            yield pages
        finally:
            await browser.close()


async def tail_reader(proc: asyncio.subprocess.Process, stats: dict[str, Any]) -> None:
    assert proc.stdout is not None
    while line := await proc.stdout.readline():
        stats["lines"] += 1
        if stats["lines"] % 50 == 0:
            row = json.loads(line)
            stats["lags"].append(time.time() - row["published"])


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _answers(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except OSError:
        return False


@contextlib.asynccontextmanager
async def viewer(run: str, url: str) -> AsyncIterator[tuple[subprocess.Popen[bytes], str]]:
    port = free_port()
    with process(PY, "-m", "agentrl.cli", "inspect", run, "--nats", url, "--port", str(port),
                 "--from", "end", "--follow") as proc:
        for _ in range(300):  # up to a minute
            if await asyncio.to_thread(_answers, f"http://127.0.0.1:{port}/api/info"):
                break
            await asyncio.sleep(0.2)
        yield proc, f"http://127.0.0.1:{port}"


async def run_publisher(url: str, run: str, rate: float, seconds: float, model: Path,
                        markers: dict[str, float]) -> str:
    pub = await asyncio.create_subprocess_exec(
        PY, __file__, "--publisher", url, run, str(rate), str(seconds), str(model),
        stdout=asyncio.subprocess.PIPE, env=ENV)
    assert pub.stdout is not None
    summary = ""
    while line := (await pub.stdout.readline()).decode():
        if line.startswith("marker "):
            _, mid, t = line.split()
            markers[mid] = float(t)
        elif line.startswith("published"):
            summary = line.strip()
    await pub.wait()
    return summary


async def bench_live(root: Path, model: Path, rate: float, seconds: float) -> dict[str, Any]:
    run_dir = make_run_dir(root, "live", model)
    async with EmbeddedNats(run_dir / "nats") as server:
        async with await Bus.connect(server.url, "live"):
            pass  # create the run's streams
        stats: dict[str, Any] = {"lines": 0, "lags": []}
        tail = await asyncio.create_subprocess_exec(
            PY, "-m", "agentrl.cli", "tail", "live", "--nats", server.url, "--json", "--follow", "--from", "end",
            stdout=asyncio.subprocess.PIPE, env=ENV)
        reading = asyncio.create_task(tail_reader(tail, stats))
        async with viewer("live", server.url) as (view_proc, url), browser_pages(url, 2) as (watch_all, watch_markers):
            await watch_all.goto(url)
            await watch_markers.goto(url + "/#/?task=marker")
            await watch_markers.wait_for_selector("#count")
            await watch_markers.evaluate(OBSERVER)
            await asyncio.sleep(3)  # tail and the viewer connected
            markers: dict[str, float] = {}
            cpu0 = {"viewer": cpu_seconds(view_proc.pid), "tail": cpu_seconds(tail.pid)}
            summary = await run_publisher(server.url, "live", rate, seconds, model, markers)
            cpu = {"viewer": cpu_seconds(view_proc.pid) - cpu0["viewer"], "tail": cpu_seconds(tail.pid) - cpu0["tail"]}
            await asyncio.sleep(3)
            seen: dict[str, float] = await watch_markers.evaluate("() => window.__seen")
            all_count = await watch_all.inner_text("#count")
        tail.send_signal(signal.SIGINT)
        await tail.wait()
        await reading
    published = int(summary.split()[1]) + len(markers)
    wall = float(summary.split()[3].rstrip("s"))  # the publisher's own clock, without its start-up
    latencies = sorted(seen[m] - t for m, t in markers.items() if m in seen)
    return {"rate": rate, "published": published, "publish_s": wall, "published_per_s": published / wall,
            "tail_lines": stats["lines"], "tail_lag_p50": statistics.median(stats["lags"]) if stats["lags"] else None,
            "tail_lag_max": max(stats["lags"]) if stats["lags"] else None, "markers": len(markers),
            "markers_seen": len(latencies), "latency_p50": statistics.median(latencies) if latencies else None,
            "latency_p95": latencies[int(0.95 * (len(latencies) - 1))] if latencies else None,
            "latency_max": latencies[-1] if latencies else None, "page_all_count": all_count,
            "viewer_cpu": cpu["viewer"] / wall, "tail_cpu": cpu["tail"] / wall}


# ---------------------------------------------------------------- 3. learner step time


PHASES = ("wait", "train", "publish")


def learner_steps(metrics: Path) -> list[dict[str, float]]:
    """Per step: wall seconds since the previous step, and the learner's own phase timings."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [{"step": b["time"] - a["time"], **{k: float(b.get(f"learner/time/{k}", 0.0)) for k in PHASES}}
            for a, b in itertools.pairwise(rows)]


def descendants(root: int) -> set[int]:
    """Every live process below ``root``."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            parent[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, ppid in parent.items() if ppid in frontier} - found
        found |= frontier
    return found


def tree_cpu(pids: set[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += cpu_seconds(pid)
    return total


def burn(fraction: float, seconds: float) -> None:
    """Busy for ``fraction`` of every 10 ms for ``seconds``: CPU load without any bus traffic."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.monotonic()
        while time.monotonic() - start < 0.01 * fraction:
            pass
        time.sleep(0.01 * (1 - fraction))


async def learner_run(root: Path, model: Path, name: str, args: argparse.Namespace,
                      load: str) -> tuple[list[dict[str, float]], float]:
    """Step times of a learner training on the stream while ``load`` runs beside it ("none", "viewer" or
    "burn:<cores>"); returns them and the CPU seconds per second that the load used."""
    run_dir = make_run_dir(root, name, model)
    sets = [f"training.batch_size={args.batch}", "training.group_size=4", "training.max_staleness=1000",
            "learner.torch_threads=1", "learner.checkpoint_every=1000", "learner.keep_weights=1",
            f"learner.metrics_file={run_dir}/learner_metrics.jsonl", f"learner.weights_dir={run_dir}/weights",
            f"learner.checkpoint_dir={run_dir}/checkpoints", f"learner.final_dir={run_dir}/final"]
    async with EmbeddedNats(run_dir / "nats") as server:
        async with await Bus.connect(server.url, name):
            pass
        argv = [PY, "-m", "agentrl.cli", "learner", "--nats", server.url, "--run", name, "--model", str(model)]
        for s in sets:
            argv += ["--set", s]
        if args.pin:  # the learner alone on CPU 0; this process and all else it starts stay on the others
            argv = ["taskset", "-c", "0", *argv]
        with process(*argv) as learner:
            async with contextlib.AsyncExitStack() as stack:
                if load == "viewer":
                    await attach_viewer(stack, name, server.url)
                await asyncio.sleep(5)  # the learner loads its model; the viewer's pages load
                skip = {learner.pid, os.getpid()}
                before = descendants(os.getpid()) - skip
                cpu0, t0 = tree_cpu(before), time.monotonic()
                publishing = asyncio.create_task(
                    run_publisher(server.url, name, args.learner_rate, args.learner_seconds, model, {}))
                if load.startswith("burn:"):
                    cores = float(load[5:])
                    for _ in range(math.ceil(cores)):
                        stack.enter_context(process(PY, __file__, "--burn", str(cores / math.ceil(cores)),
                                                    str(args.learner_seconds + 2)))
                await publishing
                after = descendants(os.getpid()) - skip
                used = (tree_cpu(before & after) - cpu0) / (time.monotonic() - t0)
    steps = learner_steps(run_dir / "learner_metrics.jsonl")
    return steps[2:], used  # the first steps warm up


async def attach_viewer(stack: contextlib.AsyncExitStack, name: str, url: str) -> None:
    """The viewer with two open pages (all trajectories, and a filter) and a ``tail --follow``."""
    _, page_url = await stack.enter_async_context(viewer(name, url))
    pages = await stack.enter_async_context(browser_pages(page_url, 2))
    await pages[0].goto(page_url)
    await pages[1].goto(page_url + "/#/?status=aborted")
    stack.enter_context(process(PY, "-m", "agentrl.cli", "tail", name, "--nats", url, "--json",
                                "--follow", "--from", "end"))


# ---------------------------------------------------------------- main


def fmt(x: float | None, unit: str = "", digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}g}{unit}"


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-inspect-") as tmp:
        root = Path(tmp)
        model = tiny_model(root)
        if args.only in ("", "tail"):
            await bench_tail_and_viewer(root, model, args)
        if args.only in ("", "learner"):
            await bench_learner(root, model, args)


async def bench_tail_and_viewer(root: Path, model: Path, args: argparse.Namespace) -> None:
    drain = await bench_drain(root, model, args.drain)
    print(f"== 1. tail --json draining {drain['n']} stored trajectories ({drain['bytes_per_traj']:.0f} B each)")
    print(f"raw ordered consumer (no decode): {drain['raw_per_s']:,.0f}/s")
    print(f"agentrl tail --json:              {drain['json_per_s']:,.0f}/s  ratio "
          f"{drain['json_per_s'] / drain['raw_per_s']:.2f}x of raw  (startup {drain['startup_s']:.2f}s subtracted)")
    print(f"agentrl tail (lines):             {drain['line_per_s']:,.0f}/s  ratio "
          f"{drain['line_per_s'] / drain['raw_per_s']:.2f}x of raw")

    live = await bench_live(root, model, args.rate, args.seconds)
    print(f"\n== 2. live at {live['rate']:.0f}/s target: published {live['published']} in {live['publish_s']:.1f}s "
          f"= {live['published_per_s']:,.0f}/s")
    print(f"tail --json --follow: {live['tail_lines']} lines ({live['tail_lines'] / max(live['published'], 1):.3f} "
          f"of published), lag p50 {fmt(live['tail_lag_p50'], 's')}, max {fmt(live['tail_lag_max'], 's')}")
    print(f"viewer, publish -> row in the filtered page: {live['markers_seen']}/{live['markers']} markers seen, "
          f"p50 {fmt(live['latency_p50'], 's')}, p95 {fmt(live['latency_p95'], 's')}, "
          f"max {fmt(live['latency_max'], 's')}; unfiltered page: {live['page_all_count']}")
    print(f"CPU while streaming: viewer process {live['viewer_cpu']:.0%} of a core, tail --json {live['tail_cpu']:.0%}")


def _report(label: str, steps: list[dict[str, float]]) -> None:
    walls = [st["step"] for st in steps]
    sd = statistics.stdev(walls) if len(walls) > 1 else 0.0
    phases = ", ".join(f"{k} {statistics.fmean(st[k] for st in steps):.3f}s" for k in PHASES)
    print(f"{label:32s}: {len(steps)} steps, mean {statistics.fmean(walls):.3f}s (stdev {sd:.3f}s; {phases})")


async def bench_learner(root: Path, model: Path, args: argparse.Namespace) -> None:
    print(f"\n== 3. learner step time while {args.learner_rate:.0f} trajectories/s stream "
          f"(B={args.batch}, tiny model, 1 thread)")
    base: list[dict[str, float]] = []
    view: list[dict[str, float]] = []
    burn: list[dict[str, float]] = []
    for r in range(args.rounds):  # interleaved, so drifting load from other processes hits every condition
        steps, base_cpu = await learner_run(root, model, f"base{r}", args, "none")
        base += steps
        steps, view_cpu = await learner_run(root, model, f"view{r}", args, "viewer")
        view += steps
        extra = max(0.0, view_cpu - base_cpu)  # what the viewer, its pages and tail added
        steps, _ = await learner_run(root, model, f"burn{r}", args, f"burn:{extra:.3f}")
        burn += steps
    print(f"  (load average of the machine at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())} "
          f"on {os.cpu_count()} CPUs)")
    _report("  without viewer", base)
    _report("  with viewer + 2 pages + tail", view)
    _report(f"  with a {extra:.2f}-core CPU burner", burn)
    print(f"  (in the last round the viewer, its browser pages and tail used {extra:.2f} cores beyond the "
          "publisher and nats-server)")
    for label, ref in (("viewer / none", base), ("viewer / same CPU burned", burn)):
        if ref and view:
            ratios = {k: statistics.fmean(st[k] for st in view) / max(statistics.fmean(st[k] for st in ref), 1e-9)
                      for k in ("step", *PHASES)}
            print(f"  ratio {label}: " + ", ".join(f"{k} {r:.2f}x" for k, r in ratios.items()))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--burn":
        burn(float(sys.argv[2]), float(sys.argv[3]))
        sys.exit(0)
    if len(sys.argv) > 1 and sys.argv[1] == "--publisher":
        url, run, rate, seconds, model = sys.argv[2:7]
        asyncio.run(publish_at_rate(url, run, float(rate), float(seconds), model))
        sys.exit(0)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--drain", type=int, default=20_000, help="stored trajectories for the tail drain (default 20000)")
    p.add_argument("--rate", type=float, default=1_000, help="trajectories/s streamed in part 2 (default 1000)")
    p.add_argument("--seconds", type=float, default=20, help="seconds of streaming in part 2 (default 20)")
    p.add_argument("--learner-rate", type=float, default=1_000, help="trajectories/s while the learner trains")
    p.add_argument("--learner-seconds", type=float, default=30, help="seconds of streaming per learner run")
    p.add_argument("--batch", type=int, default=64, help="trajectories per learner step (default 64)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the three learner runs (default 2)")
    p.add_argument("--pin", action="store_true",
                   help="part 3: the learner alone on CPU 0, everything else (viewer, browser, publisher, "
                        "nats-server) on the other CPUs, as on a host where the learner has its own cores")
    p.add_argument("--only", choices=("tail", "learner"), default="", help="run only parts 1-2, or only part 3")
    parsed = p.parse_args()
    if parsed.pin:
        os.sched_setaffinity(0, set(range(1, os.cpu_count() or 2)))  # inherited by everything started below
    asyncio.run(main(parsed))
