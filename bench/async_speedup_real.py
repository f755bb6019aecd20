"""Async speedup with the real tiny model: real engine process, agent worker, controller and learner process.

The companion of ``bench/async_speedup.py`` (simulated engine and learner). Here every piece is real:
``agentrl engine`` serving a random-init tiny Qwen2 on CPU, the real ``AgentWorker``, the controller,
and ``agentrl learner`` training that model and publishing weights that the controller loads into the
engine. The long tail comes from the agent (:func:`long_tail_episode`): each task asks for a lognormal
number of tokens (p99/p50 >= 8) with ``ignore_eos``, so lengths do not depend on what a random model says.

Generation starts only once the learner listens (no head start for async), and time per trained
trajectory is measured between the first and the last ``BatchTaken`` (steady state: process start-up and the
first batch are not counted).

The synchronous baseline admits exactly B tasks per policy version, so B >= the engine's slots (the defaults:
16 and 16) lets it use the whole engine: a fair baseline. Settings: sync (eta = 0); eta = 2; eta = 2 with
over-provisioning (alpha = 1); and, with the engine draining its running requests before every weight update
(``--weight-update drain``, as SGLang does), sync, eta = 2, and eta = 2 + APRIL (in-flight requests aborted at
each update, resumed at once token for token).

    python bench/async_speedup_real.py [--steps 8] [--batch 16] [--group 4] [--slots 16]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

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
from agentrl.messages import BatchTaken, Task, Trajectory, decode
from bench.async_speedup import lognormal_length

SIGMA = 1.0  # p99/p50 = exp(2.33 * sigma) = 10


async def long_tail_episode(ctx: Any, task: Task) -> Trajectory | None:
    """One generation of a lognormal number of tokens (continuing an aborted one where it stopped)."""
    ctx.start()
    total = lognormal_length(task.id, task.metadata["median"], SIGMA, task.sampling.max_new_tokens)
    done = len(ctx.traj) - ctx.traj.prompt_len
    await ctx.generate(max_new_tokens=max(1, total - done), ignore_eos=True)
    return ctx.finish(reward=float(task.index_in_group % 2))


def start_learner(config: Path, url: str, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "agentrl.cli", "learner", "--config", str(config), "--nats", url]
    return subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)


async def learner_ready(bus: Bus, learner: subprocess.Popen[bytes], timeout: float = 180.0) -> None:
    """Wait until the learner process has created its durable consumer (model loaded, listening)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and learner.poll() is None:
        with contextlib.suppress(Exception):
            await bus.js.consumer_info(bus.subjects.traj_stream, "learner")
            return
        await asyncio.sleep(0.2)
    raise RuntimeError("learner did not start listening")


SETTINGS: list[tuple[str, int, float | None, bool, bool]] = [  # name, eta, alpha, engine drains, APRIL abort
    ("sync (eta=0)", 0, None, False, False),
    ("async eta=2", 2, None, False, False),
    ("async eta=2, alpha=1", 2, 1.0, False, False),
    ("drain engine: sync (eta=0)", 0, None, True, False),
    ("drain engine: async eta=2", 2, None, True, False),
    ("drain engine: async eta=2 + APRIL (abort at update)", 2, None, True, True),
]


async def run_setting(url: str, model: Path, tmp: Path, setting: tuple[str, int, float | None, bool, bool],
                      args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from agentrl.agent.chat import ChatRenderer
    from agentrl.worker import AgentWorker
    from tests.fixtures.engine import start_engine

    name, eta, alpha, drain, abort = setting
    run = f"real{uuid.uuid4().hex[:8]}"
    config = tmp / f"{run}.yaml"
    training = TrainingConfig(batch_size=args.batch, group_size=args.group, max_staleness=eta, max_steps=args.steps)
    config.write_text(yaml.safe_dump({"name": run, "dir": str(tmp / run), "training": {
        "batch_size": args.batch, "group_size": args.group, "max_staleness": eta, "max_steps": args.steps},
        "learner": {"model": str(model), "device": "cpu", "torch_threads": 1}}))
    rows = [{"prompt": [5 + i % 300, 17, 23, 42], "median": args.median} for i in range(400)]
    cfg = ControllerConfig(april_alpha=alpha, max_new_tokens=args.cap, epochs=None, metrics_interval_s=1.0,
                           abort_on_update=abort)
    taken: list[float] = []
    engine_args = ["--max-running", str(args.slots), *(["--weight-update", "drain"] if drain else [])]
    async with await Bus.connect(url, run=run) as bus:

        async def on_taken(msg: Any) -> None:
            decode(msg.data, BatchTaken)
            taken.append(time.monotonic())

        await bus.nc.subscribe(bus.subjects.control("batch_taken"), cb=on_taken)
        with start_engine(model, *engine_args) as engine_url:
            clients = [EngineClient(engine_url)]
            load = EngineLoad(clients)
            core = ControllerCore(cfg, training, PromptDataset(rows, DatasetConfig(path="bench"), seed=0))
            controller = Controller(bus, core, weights=WeightsSync(clients, abort_in_flight=abort), engine_load=load,
                                    version_poll_s=0.5)
            router = Router([EngineClient(engine_url)])
            worker = AgentWorker(bus, agent=long_tail_episode, generator=router,
                                 chat=ChatRenderer(AutoTokenizer.from_pretrained(model)),
                                 config=WorkerConfig(concurrency=64, poll_timeout_s=0.05, uvloop=False))
            learner = start_learner(config, url, tmp / f"{run}-learner.log")
            await learner_ready(bus, learner)  # no head start: generation begins once the learner listens
            actors = [asyncio.create_task(controller.run()), asyncio.create_task(worker.run())]
            running: list[float] = []
            try:
                while learner.poll() is None:
                    await asyncio.sleep(0.5)
                    await load.sample()
                    running += [load.report().get("controller/engine_running_mean", 0.0)]
                assert learner.returncode == 0, (tmp / f"{run}-learner.log").read_text()[-2000:]
            finally:
                if learner.poll() is None:
                    learner.kill()
                    learner.wait()
                controller.stop()
                worker.stop()
                await asyncio.wait(actors, timeout=60)
                await asyncio.gather(*(c.close() for c in [*clients, *router.engines]))
    per_traj = (taken[-1] - taken[0]) / ((len(taken) - 1) * args.batch)
    c = core.state.counters
    trained_max = max((age for age, n in core.state.staleness_hist.items() if n and age <= eta), default=0)
    return {"name": name, "eta": eta, "per_traj_ms": 1000 * per_traj, "steps": len(taken),
            "busy": sum(running) / max(1, len(running)) / args.slots, "trained_max": trained_max,
            "violations": c.stale_violations, "aborted": worker.stats.resumed_here, "resumed": c.resumed,
            "stale_tokens": c.stale_tokens, "trained_tokens": c.trained_tokens}


async def main_async(args: argparse.Namespace) -> int:
    from agentrl.engine.tiny import TinyModelSpec, init_model

    settings = [s for s in SETTINGS if args.only is None or args.only in s[0]]
    results = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model = init_model(tmp / "model", TinyModelSpec(hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                                                        layers=args.layers))
        async with EmbeddedNats(tmp / "nats") as server:
            for setting in settings:
                r = await run_setting(server.url, model, tmp, setting, args)
                print(f"{setting[0]}: {r['per_traj_ms']:.0f} ms/traj", flush=True)
                results.append(r)
    bases = {False: results[0]["per_traj_ms"]}
    bases[True] = next((r["per_traj_ms"] for r in results if r["name"].startswith("drain engine: sync")), bases[False])
    print(f"real tiny model (CPU), B={args.batch}, n={args.group}, {args.steps} steps, engine max-running "
          f"{args.slots}, model hidden {args.hidden} x {args.layers} layers, lengths lognormal median "
          f"{args.median:.0f} sigma {SIGMA} cap {args.cap}")
    print("| setting | ms / trained traj (steady state) | speedup vs its sync | engine slots busy (sampled) "
          "| max trained staleness | tokens masked (> eta) | aborted attempts | resumed episodes |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        masked = r["stale_tokens"] / max(1, r["stale_tokens"] + r["trained_tokens"])
        base = bases[r["name"].startswith("drain engine")]
        print(f"| {r['name']} | {r['per_traj_ms']:.0f} | {base / r['per_traj_ms']:.2f}x | {r['busy']:.0%} | "
              f"{r['trained_max']} (bound {r['eta']}) | {masked:.1%} | {r['aborted']} | {r['resumed']} |")
    ok = all(r["violations"] == 0 for r in results)
    print("staleness bound held in every setting" if ok else "STALENESS BOUND VIOLATED")
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--slots", type=int, default=16, help="engine max-running (the sync baseline fills it when B >= slots)")
    p.add_argument("--only", default=None, help="run only the settings whose name contains this text")
    p.add_argument("--median", type=float, default=16.0, help="median tokens per episode")
    p.add_argument("--cap", type=int, default=256, help="max tokens per episode")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(main_async(args))
    return 130


if __name__ == "__main__":
    raise SystemExit(main())
