"""Async speedup with a real model: real engine process, agent worker, controller and learner process.

The companion of ``bench/async_speedup.py`` (simulated engine and learner). Here every piece is real:
``agentrl engine`` serving a random-init Qwen2 (a tiny one on CPU by default; ``--shape qwen2.5-0.5b`` on a GPU),
the real ``AgentWorker``, the controller, and ``agentrl learner`` training that model and publishing weights that
the controller loads into the engine. The long tail comes from the agent (:func:`long_tail_episode`): each task
asks for a lognormal number of tokens (sigma 1: p99/p50 = 10) with ``ignore_eos``, so lengths do not depend on
what a random model says.

Generation starts only once the learner listens (no head start for async), and time per trained
trajectory is measured between two ``BatchTaken`` messages, the ``--warmup``-th after the first and the last
(steady state: process start-up and the first batches are not counted).

The synchronous baseline admits exactly B tasks per policy version, so B >= the engine's slots (the defaults:
16 and 16) lets it use the whole engine: a fair baseline. Settings (``--settings``, default all): ``sync`` (eta =
0); ``eta2``; ``eta2-alpha1`` (over-provisioning alpha = 1); ``eta2-overlap`` (``learner.overlap_publish``: each
version written while the learner takes its next batch); and, with the engine draining its running requests
before every weight update (``--weight-update drain``, as SGLang does), ``drain-sync``, ``drain-eta2`` and
``drain-eta2-april`` (in-flight requests aborted at each update, resumed at once token for token).

Besides the speedup, each actor's utilisation over the same window (:mod:`bench._async_usage`): the engine's busy
fraction (``active_time_s`` from ``/get_server_info``: wall time of scheduler iterations that ran a forward step,
over wall time) and output
tokens/s, and the learner's fractions of wall time training, waiting for a batch and publishing weights (its
per-step ``learner/time/*`` metrics).

On one GPU the engine and the learner share the device side by side: the engine's KV pool is sized by its
context (prompt + ``--cap``) for ``--slots`` running requests (or ``--kv-tokens``), the learner takes the rest.

    python bench/async_speedup_real.py [--steps 8] [--batch 16] [--group 4] [--slots 16]     # CPU, tiny model
    python bench/async_speedup_real.py --device cuda --shape qwen2.5-0.5b --dtype bfloat16 --batch 128 --group 8 \\
        --slots 128 --median 256 --cap 4096 --steps 6 --warmup 1 --checkpoint-every 1000 --settings sync eta2
    python bench/async_speedup_real.py --device cpu --shape small --batch 8 --group 4 --slots 8 --median 16 \\
        --cap 64 --steps 4 --warmup 1 --settings sync eta2     # a CPU smoke run of the GPU options
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import yaml

if __package__ in (None, ""):  # run as a script: make the repo root importable (bench, tests.fixtures)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agentrl.bus import Bus, EmbeddedNats
from agentrl.client import EngineClient, Router
from agentrl.config.controller import ControllerConfig, DatasetConfig
from agentrl.config.training import TrainingConfig
from agentrl.config.worker import WorkerConfig
from agentrl.controller.controller import Controller
from agentrl.controller.core import ControllerCore
from agentrl.controller.dataset import PromptDataset
from agentrl.controller.engine_load import EngineLoad
from agentrl.controller.weights_sync import WeightsSync
from agentrl.errors import EngineError
from agentrl.messages import BatchTaken, Task, Trajectory, decode
from bench._async_usage import EngineCounters, engine_usage, learner_usage, read_metrics
from bench.async_speedup import lognormal_length
from bench.engine import SHAPES

SIGMA = 1.0  # p99/p50 = exp(2.33 * sigma) = 10
PROMPT_LEN = 4  # tokens of each task's prompt


async def long_tail_episode(ctx: Any, task: Task) -> Trajectory | None:
    """One generation of a lognormal number of tokens (continuing an aborted one where it stopped)."""
    ctx.start()
    total = lognormal_length(task.id, task.metadata["median"], SIGMA, task.sampling.max_new_tokens)
    done = len(ctx.traj) - ctx.traj.prompt_len
    await ctx.generate(max_new_tokens=max(1, total - done), ignore_eos=True)
    return ctx.finish(reward=float(task.index_in_group % 2))


@dataclass(frozen=True)
class Setting:
    """One configuration of the loop: staleness bound, over-provisioning, how the engine takes new weights."""

    key: str
    name: str
    eta: int
    alpha: float | None = None
    drain: bool = False  # the engine drains its running requests before a weight update (SGLang)
    abort: bool = False  # APRIL: the controller aborts in-flight requests at each update
    overlap: bool = False  # learner.overlap_publish: each version written while the learner takes its next batch

    @property
    def is_sync(self) -> bool:
        return self.eta == 0


SETTINGS = [
    Setting("sync", "sync (eta=0)", 0),
    Setting("eta2", "async eta=2", 2),
    Setting("eta2-alpha1", "async eta=2, alpha=1", 2, 1.0),
    Setting("eta2-overlap", "async eta=2, overlapped publish", 2, overlap=True),
    Setting("drain-sync", "drain engine: sync (eta=0)", 0, drain=True),
    Setting("drain-eta2", "drain engine: async eta=2", 2, drain=True),
    Setting("drain-eta2-april", "drain engine: async eta=2 + APRIL (abort at update)", 2, drain=True, abort=True),
]


def start_learner(config: Path, url: str, log: Path, device: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if device == "cpu" else dict(os.environ)
    argv = [sys.executable, "-m", "agentrl.cli", "learner", "--config", str(config), "--nats", url]
    return subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)


async def learner_ready(bus: Bus, learner: subprocess.Popen[bytes], timeout: float = 600.0) -> None:
    """Wait until the learner process has created its durable consumer (model loaded, listening)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and learner.poll() is None:
        with contextlib.suppress(Exception):
            await bus.js.consumer_info(bus.subjects.traj_stream, "learner")
            return
        await asyncio.sleep(0.2)
    raise RuntimeError("learner did not start listening")


def learner_section(model: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The run config's ``learner`` section: the model on ``--device`` (the engine's device too)."""
    section: dict[str, Any] = {"model": str(model), "device": args.device,
                               "torch_threads": 1 if args.device == "cpu" else 0}
    if args.dtype != "auto":
        section["dtype"] = args.dtype
    if args.checkpoint_every != 1:
        section["checkpoint_every"] = args.checkpoint_every
    return section


def write_config(path: Path, run: str, model: Path, setting: Setting, args: argparse.Namespace) -> None:
    training = {"batch_size": args.batch, "group_size": args.group, "max_staleness": setting.eta,
                "max_steps": args.steps}
    learner = {**learner_section(model, args), **({"overlap_publish": True} if setting.overlap else {})}
    path.write_text(yaml.safe_dump({"name": run, "dir": str(path.parent / run), "training": training,
                                    "learner": learner}))


def engine_args(args: argparse.Namespace, drain: bool) -> list[str]:
    """Flags of ``agentrl engine``: device and dtype, running slots, context for the longest episode, KV pool."""
    out = ["--device", args.device, "--dtype", args.dtype, "--max-running", str(args.slots),
           "--context-length", str(PROMPT_LEN + args.cap + 8)]
    if args.kv_tokens:
        out += ["--max-total-tokens", str(args.kv_tokens)]
    return out + (["--weight-update", "drain"] if drain else [])


@dataclass
class Probe:
    """What happens at each ``BatchTaken``: its arrival time and the engine's counters read right then."""

    engine: EngineClient
    taken: list[float] = field(default_factory=list)
    counters: list[EngineCounters | None] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)  # the last /get_server_info reply

    async def on_taken(self, msg: Any) -> None:
        decode(msg.data, BatchTaken)
        self.taken.append(time.monotonic())
        try:
            self.info = await self.engine.get_server_info()
        except EngineError:
            self.counters.append(None)
        else:
            self.counters.append(EngineCounters.from_info(self.info))


async def watch(learner: subprocess.Popen[bytes], load: EngineLoad, log: Path) -> list[float]:
    """Sample the engine's running requests every 0.5 s until the learner exits (it must exit cleanly)."""
    running: list[float] = []
    while learner.poll() is None:
        await asyncio.sleep(0.5)
        await load.sample()
        running += [load.report().get("controller/engine_running_mean", 0.0)]
    if learner.returncode != 0:
        tail = await asyncio.to_thread(log.read_text)
        raise RuntimeError(f"learner exited with {learner.returncode}:\n{tail[-2000:]}")
    return running


async def run_setting(url: str, model: Path, tmp: Path, setting: Setting, args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from agentrl.agent.chat import ChatRenderer
    from agentrl.worker import AgentWorker
    from tests.fixtures.engine import start_engine

    run = f"real{uuid.uuid4().hex[:8]}"
    write_config(tmp / f"{run}.yaml", run, model, setting, args)
    training = TrainingConfig(batch_size=args.batch, group_size=args.group, max_staleness=setting.eta,
                              max_steps=args.steps)
    rows = [{"prompt": [5 + i % 300, 17, 23, 42], "median": args.median} for i in range(400)]
    cfg = ControllerConfig(april_alpha=setting.alpha, max_new_tokens=args.cap, epochs=None, metrics_interval_s=1.0,
                           abort_on_update=setting.abort)
    log = tmp / f"{run}-learner.log"
    timeout = 60.0 if args.device == "cpu" else 600.0
    async with await Bus.connect(url, run=run) as bus:
        with start_engine(model, *engine_args(args, setting.drain), timeout=timeout) as engine_url:
            clients = [EngineClient(engine_url)]
            probe = Probe(clients[0])
            await bus.nc.subscribe(bus.subjects.control("batch_taken"), cb=probe.on_taken)
            load = EngineLoad(clients)
            core = ControllerCore(cfg, training, PromptDataset(rows, DatasetConfig(path="bench"), seed=0))
            controller = Controller(bus, core, weights=WeightsSync(clients, abort_in_flight=setting.abort),
                                    engine_load=load, version_poll_s=0.5)
            router = Router([EngineClient(engine_url)])
            worker = AgentWorker(bus, agent=long_tail_episode, generator=router,
                                 chat=ChatRenderer(cast(Any, AutoTokenizer.from_pretrained(model))),
                                 config=WorkerConfig(concurrency=max(64, 2 * args.slots), poll_timeout_s=0.05,
                                                     uvloop=False))
            learner = start_learner(tmp / f"{run}.yaml", url, log, args.device)
            await learner_ready(bus, learner)  # no head start: generation begins once the learner listens
            actors = [asyncio.create_task(controller.run()), asyncio.create_task(worker.run())]
            try:
                running = await watch(learner, load, log)
            finally:
                if learner.poll() is None:
                    learner.kill()
                    learner.wait()
                controller.stop()
                worker.stop()
                await asyncio.wait(actors, timeout=60)
                await asyncio.gather(*(c.close() for c in [*clients, *router.engines]))
    records = read_metrics(tmp / run / "learner_metrics.jsonl")
    if args.artifacts:
        keep = Path(args.artifacts) / setting.key
        keep.mkdir(parents=True, exist_ok=True)
        for path in (log, tmp / run / "learner_metrics.jsonl"):
            shutil.copy(path, keep / path.name)
    return summarise(setting, core, worker.stats.resumed_here, running, probe, records, args)


def summarise(setting: Setting, core: ControllerCore, aborted: int, running: list[float], probe: Probe,
              records: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """One setting's row: steady-state time per trained trajectory, staleness, and each actor's utilisation."""
    taken, first = probe.taken, args.warmup  # taken[i] is the BatchTaken of learner step i + 1
    if len(taken) < first + 2:
        raise RuntimeError(f"{setting.name}: {len(taken)} batches taken, the window needs {first + 2}")
    seconds = taken[-1] - taken[first]
    intervals = len(taken) - 1 - first
    c = core.state.counters
    trained_max = max((age for age, n in core.state.staleness_hist.items() if n and age <= setting.eta), default=0)
    state = (probe.info.get("internal_states") or [{}])[0]
    return {"setting": setting, "per_traj_ms": 1000 * seconds / (intervals * args.batch),
            "s_per_step": seconds / intervals, "steps": len(taken),
            "busy": sum(running) / max(1, len(running)) / args.slots, "trained_max": trained_max,
            "violations": c.stale_violations, "aborted": aborted, "resumed": c.resumed,
            "stale_tokens": c.stale_tokens, "trained_tokens": c.trained_tokens,
            "kv_positions": probe.info.get("max_total_num_tokens", 0), "kv_bytes": state.get("kv_cache_bytes", 0),
            **engine_usage(probe.counters[first], probe.counters[-1], seconds),
            **learner_usage(records, first + 1, len(taken), seconds)}


def model_spec(args: argparse.Namespace) -> Any:
    from agentrl.engine.tiny import TinyModelSpec

    if args.shape is None:
        return TinyModelSpec(hidden_size=args.hidden, intermediate_size=2 * args.hidden, layers=args.layers)
    return SHAPES[args.shape]


async def main_async(args: argparse.Namespace) -> int:
    from agentrl.engine.tiny import init_model

    settings = [s for s in SETTINGS if (args.only is None or args.only in s.name)
                and (args.settings is None or s.key in args.settings)]
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)  # a timeout: stop engine, learner
    results = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model = init_model(tmp / "model", model_spec(args))
        async with EmbeddedNats(tmp / "nats") as server:
            for setting in settings:
                r = await run_setting(server.url, model, tmp, setting, args)
                print(f"{setting.name}: {r['per_traj_ms']:.0f} ms/traj, {usage_line(r)}", flush=True)
                results.append(r)
    report(results, args)
    ok = all(r["violations"] == 0 for r in results)
    print("staleness bound held in every setting" if ok else "STALENESS BOUND VIOLATED")
    return 0 if ok else 1


def usage_line(r: dict[str, Any]) -> str:
    engine = f"engine busy {r['engine_busy']:.0%}, {r['engine_tok_s']:,.0f} tok/s" if "engine_busy" in r else \
        "engine counters unavailable"
    return (f"{r['s_per_step']:.2f} s/step, {engine}; learner training {r['learner_train']:.0%} "
            f"({r['learner_tok_s']:,.0f} tok/s), waiting {r['learner_wait']:.0%}, publishing {r['learner_publish']:.0%}")


def describe(args: argparse.Namespace, results: list[dict[str, Any]]) -> str:
    model = f"shape {args.shape}" if args.shape else f"tiny model hidden {args.hidden} x {args.layers} layers"
    kv = max(results, key=lambda r: r["kv_positions"], default={"kv_positions": 0, "kv_bytes": 0})
    return (f"real model ({model}, random weights) on {args.device}, dtype {args.dtype}, B={args.batch}, "
            f"n={args.group}, {args.steps} steps (window from step {args.warmup + 1}), engine max-running "
            f"{args.slots}, KV pool {kv['kv_positions']:,} positions ({kv['kv_bytes'] / 2**30:.2f} GiB), engine and "
            f"learner side by side on one {args.device} device, lengths lognormal median {args.median:.0f} sigma "
            f"{SIGMA} cap {args.cap}")


def base_of(r: dict[str, Any], results: list[dict[str, Any]]) -> float | None:
    """The ms/traj of the sync run with the same engine (swap or drain) in this invocation, if any."""
    drain = r["setting"].drain
    return next((b["per_traj_ms"] for b in results if b["setting"].is_sync and b["setting"].drain == drain), None)


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(describe(args, results))
    print("| setting | ms / trained traj (steady state) | speedup vs its sync | engine slots busy (sampled) "
          "| max trained staleness | tokens masked (> eta) | aborted attempts | resumed episodes |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        masked = r["stale_tokens"] / max(1, r["stale_tokens"] + r["trained_tokens"])
        base = base_of(r, results)
        speedup = f"{base / r['per_traj_ms']:.2f}x" if base else "no sync run"
        print(f"| {r['setting'].name} | {r['per_traj_ms']:.0f} | {speedup} | {r['busy']:.0%} | "
              f"{r['trained_max']} (bound {r['setting'].eta}) | {masked:.1%} | {r['aborted']} | {r['resumed']} |")
    print("\nutilisation over the same window (fractions of wall time):")
    print("| setting | s / step | engine busy (iterations with a forward step) | engine idle | engine output tok/s "
          "| learner training | learner tok/s (train time) | learner waiting for a batch | learner publishing weights |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        busy = r.get("engine_busy")
        engine = f"{busy:.0%} | {1 - busy:.0%} | {r['engine_tok_s']:,.0f}" if busy is not None else "n/a | n/a | n/a"
        print(f"| {r['setting'].name} | {r['s_per_step']:.2f} | {engine} | {r['learner_train']:.0%} | "
              f"{r['learner_tok_s']:,.0f} | {r['learner_wait']:.0%} | {r['learner_publish']:.0%} |")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=0, help="learner steps after the first left out of the window")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--slots", type=int, default=16, help="engine max-running (the sync baseline fills it when B >= slots)")
    p.add_argument("--only", default=None, help="run only the settings whose name contains this text")
    p.add_argument("--settings", nargs="+", choices=[s.key for s in SETTINGS], help="run only these settings")
    p.add_argument("--median", type=float, default=16.0, help="median tokens per episode")
    p.add_argument("--cap", type=int, default=256, help="max tokens per episode")
    p.add_argument("--device", default="cpu", help="engine and learner device: cpu, cuda, cuda:N")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="engine and learner dtype (auto: float32 on CPU, bf16 weights / autocast on GPU)")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None,
                   help="a model shape of bench/engine.py; default: the tiny model of --hidden and --layers")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--kv-tokens", type=int, default=0,
                   help="engine KV pool positions; 0 = the engine's default, (slots + 16) x (prompt + cap + 8)")
    p.add_argument("--checkpoint-every", type=int, default=1,
                   help="learner checkpoint interval in steps (it always checkpoints after the last one)")
    p.add_argument("--artifacts", default="", help="copy each setting's learner log and metrics into DIR/<setting>")
    args = p.parse_args()
    if args.steps < args.warmup + 2:
        p.error(f"--steps {args.steps} leaves no window after --warmup {args.warmup} (need steps >= warmup + 2)")
    return args


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    try:
        return asyncio.run(main_async(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
