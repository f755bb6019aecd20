"""End to end with every real piece: engine process (tiny model), agent worker, controller, learner process.

APRIL: the controller asks the engine to abort its in-flight requests whenever it loads new weights
(``abort_on_update``, SGLang's ``abort_all_requests``); each aborted episode resumes at once on its worker and
comes back as one trajectory whose response tokens, logprobs and per-token versions are exactly the
concatenation of the segments the engine produced before and after the abort. New weights reach the engine
through the controller.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from agentrl.bus import Bus
from agentrl.client import EngineClient, Router
from agentrl.config.controller import ControllerConfig, DatasetConfig
from agentrl.config.training import TrainingConfig
from agentrl.config.worker import WorkerConfig
from agentrl.controller.controller import Controller, build_core
from agentrl.controller.engine_load import EngineLoad
from agentrl.controller.weights_sync import WeightsSync
from agentrl.generation import GenerateOutput
from agentrl.messages import Event, SamplingParams, Task, Trajectory, decode
from tests.fixtures.engine import start_engine

pytestmark = pytest.mark.slow


class Recording:
    """A Generator proxy that keeps every engine output per task id (the worker's view of the engine)."""

    def __init__(self, inner: Router) -> None:
        self.inner = inner
        self.outputs: dict[str, list[GenerateOutput]] = {}

    async def generate(self, input_ids: Any, sampling: SamplingParams, *, rid: str | None = None,
                       session_id: str | None = None) -> GenerateOutput:
        out = await self.inner.generate(input_ids, sampling, rid=rid, session_id=session_id)
        self.outputs.setdefault((session_id or "").rsplit("-", 1)[0], []).append(out)
        return out

    async def abort(self, rid: str) -> None:
        await self.inner.abort(rid)


async def coin(task: Task, text: str) -> float:
    return float(task.index_in_group % 2)


def start_learner(config: Path, url: str, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "agentrl.cli", "learner", "--config", str(config), "--nats", url]
    return subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)


def wait_for_line(log: Path, text: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in (log.read_text() if log.exists() else ""):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no {text!r} in the log:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


def wait_or_none(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


async def read_all(bus: Bus) -> list[Trajectory]:
    consumer = await bus.consumer(bus.subjects.traj, durable="inspect", typ=Trajectory)
    out: list[Trajectory] = []
    while True:
        try:
            batch = await consumer.fetch(batch=256, timeout=1.0)
        except TimeoutError:  # nats-py's multi-message pull may raise instead of returning nothing
            batch = []
        if not batch:
            return out
        out += [d.msg for d in batch]


async def test_abort_and_resume_end_to_end(bus: Bus, nats_url: str, run_name: str, tmp_path: Path,
                                           tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from agentrl.agent.chat import ChatRenderer
    from agentrl.worker import AgentWorker
    from agents.single_turn import run_episode

    steps, batch, eta = 3, 4, 1
    config = tmp_path / "run.yaml"
    training = {"batch_size": batch, "group_size": 2, "max_staleness": eta, "stale_policy": "mask", "max_steps": steps}
    config.write_text(yaml.safe_dump({"name": run_name, "dir": str(tmp_path / "run"), "training": training,
                                      "learner": {"model": str(tiny_model_dir), "device": "cpu", "torch_threads": 1}}))
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": [5 + i, 17, 23, 42]}) + "\n" for i in range(32)))
    cfg = ControllerConfig(dataset=DatasetConfig(path=str(data)), april_alpha=1.0, max_new_tokens=160, epochs=None,
                           metrics_interval_s=1.0, abort_on_update=True)
    learner_log = tmp_path / "learner.log"
    # one request decodes at a time: whatever is left of a step's surplus when its weights come is still in
    # flight (on a fast machine four concurrent episodes can all finish within one learner step)
    with start_engine(tiny_model_dir, "--max-running", "1") as url:
        router = Router([EngineClient(url)])
        gen = Recording(router)
        worker = AgentWorker(bus, agent=run_episode, generator=gen, chat=ChatRenderer(AutoTokenizer.from_pretrained(tiny_model_dir)),
                             reward=coin, config=WorkerConfig(concurrency=16, poll_timeout_s=0.1, uvloop=False))
        core = await build_core(bus, cfg, TrainingConfig(**training))  # type: ignore[arg-type]
        clients = [EngineClient(url)]
        weights = WeightsSync(clients, abort_in_flight=True)
        controller = Controller(bus, core, weights=weights, engine_load=EngineLoad(clients), version_poll_s=0.5)
        metrics: list[dict[str, Any]] = []

        async def on_metrics(msg: Any) -> None:
            metrics.append(decode(msg.data, Event).data)

        await bus.nc.subscribe(bus.subjects.events("metrics"), cb=on_metrics)
        learner = start_learner(config, nats_url, learner_log)
        # rollouts start once the learner is up: the episodes it does not take for a step are still decoding
        # when that step's weights come, not all finished while it loaded
        await asyncio.to_thread(wait_for_line, learner_log, "learner ready", learner, 120)
        actors = [asyncio.create_task(controller.run(), name="controller"),
                  asyncio.create_task(worker.run(), name="worker")]
        try:
            code = await asyncio.to_thread(wait_or_none, learner, 240)
            assert code == 0, (f"learner exit {code}; controller {core.metrics()}; worker {worker.stats}\n"
                               + learner_log.read_text()[-3000:])
            for _ in range(50):  # the controller loads the last weights into the engine
                if core.version >= steps:
                    break
                await asyncio.sleep(0.2)
            async with EngineClient(url) as client:
                engine_version = await client.get_weight_version()
        finally:
            if learner.poll() is None:
                learner.kill()
                learner.wait()
            controller.stop()
            worker.stop()
            _, pending = await asyncio.wait(actors, timeout=60)
            assert not pending, f"did not stop: {[t.get_name() for t in pending]}"
            await weights.close()
            await asyncio.gather(*(e.close() for e in router.engines))  # no health loop was started

    assert engine_version == steps
    idle = [m["controller/engine_idle_frac"] for m in metrics if "controller/engine_idle_frac" in m]
    assert idle and all(0.0 <= f <= 1.0 for f in idle)
    c = core.state.counters
    assert c.trained == steps * batch and c.resumed > 0 and worker.stats.resumed_here > 0
    trained_ages = [age for age, n in core.state.staleness_hist.items() if n and age <= eta]
    assert trained_ages and c.stale_violations == 0
    everything = await read_all(bus)
    assert any(t.status == "aborted" for t in everything)  # every aborted attempt is visible on the stream
    resumed = [t for t in everything if t.attempt > 0 and t.status != "aborted"]
    mid_generation = [t for t in resumed if len(gen.outputs[t.task_id][0].output_ids) > 0]
    assert mid_generation, "no episode was aborted mid-generation and resumed"  # (some are aborted while queued)
    for traj in resumed:
        segments = gen.outputs[traj.task_id]
        assert len(segments) >= 2 and segments[0].finish_reason == "abort"
        response = traj.tokens[traj.prompt_len:]
        assert np.array_equal(response, np.concatenate([s.output_ids for s in segments]))
        assert np.array_equal(traj.versions[traj.prompt_len:], np.concatenate([s.versions for s in segments]))
        assert np.array_equal(traj.logprobs[traj.prompt_len:], np.concatenate([s.logprobs for s in segments]))
