"""The controller on a real nats-server with a real agent worker: APRIL aborts at weight updates and
token-for-token resumes, the staleness bound, dynamic sampling by the learner, eval passes reported
separately, metrics events."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agentrl.bus import Bus
from agentrl.config.controller import ControllerConfig, DatasetConfig, EvalConfig
from agentrl.config.training import TrainingConfig
from agentrl.controller.controller import Controller, build_core
from agentrl.controller.weights_sync import WeightsSync
from agentrl.messages import Event, decode

pytestmark = pytest.mark.slow


def write_prompts(path: Path, n: int) -> str:
    path.write_text("".join(json.dumps({"prompt": [11 + i, 12, 13, 14]}) + "\n" for i in range(n)))
    return str(path)


async def test_april_resumes_token_for_token_within_bound(bus: Bus, tmp_path: Path, start_rollout: Any) -> None:
    steps, batch, eta = 6, 4, 2
    cfg = ControllerConfig(
        dataset=DatasetConfig(path=write_prompts(tmp_path / "train.jsonl", 40)), april_alpha=1.0, epochs=None,
        metrics_interval_s=0.5, abort_on_update=True,
        eval=EvalConfig(dataset=DatasetConfig(path=write_prompts(tmp_path / "eval.jsonl", 3)), interval=3),
    )
    training = TrainingConfig(group_size=2, batch_size=batch, max_staleness=eta, max_steps=steps)
    metrics: list[dict[str, Any]] = []

    async def on_metrics(msg: Any) -> None:
        metrics.append(decode(msg.data, Event).data)

    await bus.nc.subscribe(bus.subjects.events("metrics"), cb=on_metrics)
    async with start_rollout(bus, batch=batch, eta=eta, steps=steps, slots=6, median=40.0, drain=True) as r:
        core = await build_core(bus, cfg, training)
        controller = Controller(bus, core, weights=WeightsSync([r.engine], abort_in_flight=True), version_poll_s=0.2)
        running = asyncio.create_task(controller.run())
        stats = await asyncio.wait_for(r.learner.run(), timeout=120)
        await asyncio.sleep(1.0)  # let the last eval pass finish
        controller.stop()
        await asyncio.wait_for(running, timeout=30)

    trained = stats.trained
    assert len(trained) == steps * batch and len(set(trained)) == len(trained)
    assert max(stats.staleness) <= eta
    assert r.engine.aborted > 0 and stats.resumed > 0  # in-flight requests were cut at weight updates
    assert r.worker.stats.resumed_here > 0
    for traj in stats.trajectories:
        segments = r.engine.outputs[traj.task_id]
        response = traj.tokens[traj.prompt_len:]
        assert np.array_equal(response, np.concatenate([s.output_ids for s in segments]))
        assert np.array_equal(traj.versions[traj.prompt_len:], np.concatenate([s.versions for s in segments]))
        if traj.attempt > 0:  # aborted, then resumed: several segments, later ones never older
            assert len(segments) >= 2 and segments[0].finish_reason == "abort"
            assert np.all(np.diff(traj.versions[traj.prompt_len:]) >= 0)
            assert [t.kind for t in traj.turns].count("abort") == traj.attempt  # where each abort fell
    evals = [m for m in metrics if "controller/eval/version" in m]
    assert {m["controller/eval/version"] for m in evals} >= {0.0, 3.0}
    assert not any("controller/eval/accuracy" in m for m in evals)  # a plain reward gives no verdict: no accuracy
    assert all(m["controller/eval/episodes"] == 3 for m in evals)
    assert any(m.get("controller/trained", 0) > 0 for m in metrics)
    assert not any(t.startswith("eval") for t in trained)  # eval episodes are never trained on


async def row_reward(task: Any, text: str) -> float:
    """Even rows: every member gets 1 (a zero-variance group); odd rows: members differ."""
    return 1.0 if task.metadata["row"] % 2 == 0 else float(task.index_in_group % 2)


async def test_dynamic_sampling_keeps_batches_full(bus: Bus, tmp_path: Path, start_rollout: Any) -> None:
    steps, batch, eta = 4, 4, 1
    cfg = ControllerConfig(dataset=DatasetConfig(path=write_prompts(tmp_path / "train.jsonl", 40), shuffle=False),
                           epochs=1)
    training = TrainingConfig(group_size=2, batch_size=batch, max_staleness=eta, max_steps=steps,
                              group_filter="trainer.batching.drop_zero_variance")
    async with start_rollout(bus, batch=batch, eta=eta, steps=steps, reward=row_reward, dynamic_sampling=True) as r:
        core = await build_core(bus, cfg, training)
        controller = Controller(bus, core, weights=WeightsSync([r.engine]), version_poll_s=0.2)
        running = asyncio.create_task(controller.run())
        stats = await asyncio.wait_for(r.learner.run(), timeout=120)
        controller.stop()
        await asyncio.wait_for(running, timeout=30)

    assert len(stats.trained) == steps * batch  # full batches although half the groups teach nothing
    rewards: dict[str, set[float]] = {}
    for t in stats.trajectories:
        rewards.setdefault(t.group_id, set()).add(t.reward)
    assert all(len(v) == 2 for v in rewards.values())  # only groups with reward variance were trained
    c = core.state.counters
    assert c.dropped == len(r.learner.filtered) > 0  # the controller replaced exactly what the learner dropped
    assert c.accepted == c.finished - c.dropped  # dropped groups no longer hold admission capacity
