"""A real learner subprocess on a real nats-server, SIGKILLed twice mid-run: every trajectory trained once."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agentrl.bus import Bus
from agentrl.messages import Trajectory, WeightUpdate, decode
from tests.fixtures.learner import synth_trajectories

pytestmark = pytest.mark.slow

STEPS = 16  # 32 trajectories in groups of 2, 2 per step


def learner_cmd(url: str, run: str, model: Path, run_dir: Path) -> list[str]:
    sets = {
        "dir": str(run_dir), "learner.device": "cpu", "learner.torch_threads": 1, "learner.optim.lr": 1e-3,
        "learner.batch.trajectories_per_step": 2, "learner.keep_checkpoints": 2,
        "learner.batch.ack_wait_s": 2,  # what the killed learner held comes back to the next one after 2 s
    }
    cmd = [sys.executable, "-m", "agentrl.cli", "learner", "--nats", url, "--run", run, "--model", str(model),
           "--max-steps", str(STEPS)]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    return cmd


def committed_step(run_dir: Path) -> int:
    latest = run_dir / "checkpoints" / "LATEST"
    try:
        name = latest.read_text().strip()
        return int(json.loads((run_dir / "checkpoints" / name / "state.json").read_text())["step"])
    except (FileNotFoundError, ValueError):
        return 0


def run_until(cmd: list[str], run_dir: Path, step: int, log: Path) -> int:
    """Start the learner; SIGKILL it as soon as a checkpoint of ``step`` or later is committed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 180
            while committed_step(run_dir) < step and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(10)
    return committed_step(run_dir)


async def test_sigkill_restart_trains_each_trajectory_exactly_once(
    nats_url: str, run_name: str, tiny_qwen2_dir: Path, tmp_path: Path
) -> None:
    trajs = synth_trajectories(num_groups=STEPS, group_size=2, seed=3)
    run_dir = tmp_path / "run"
    cmd = learner_cmd(nats_url, run_name, tiny_qwen2_dir, run_dir)
    log = tmp_path / "learner.log"
    async with await Bus.connect(nats_url, run=run_name) as bus:
        updates: list[WeightUpdate] = []

        async def on_weights(msg: object) -> None:
            updates.append(decode(msg.data, WeightUpdate))  # type: ignore[attr-defined]

        await bus.nc.subscribe(bus.subjects.events("weights"), cb=on_weights)
        await publish(bus, trajs[:20])
        first = await asyncio.to_thread(run_until, cmd, run_dir, 3, log)
        await publish(bus, trajs[16:])  # late arrivals, and duplicates that JetStream deduplicates
        second = await asyncio.to_thread(run_until, cmd, run_dir, first + 4, log)
        assert 3 <= first < second < STEPS, log.read_text()[-3000:]

        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = await asyncio.to_thread(subprocess.run, cmd, env=env, capture_output=True, timeout=240)
        assert done.returncode == 0, done.stderr.decode()[-3000:]
        version = await bus.get_version()
        await bus.nc.flush()

    state = json.loads((run_dir / "checkpoints" / (run_dir / "checkpoints" / "LATEST").read_text() /
                        "state.json").read_text())
    trained = [tid for rec in state["history"] for tid in rec["trained"]]
    assert sorted(trained) == sorted(t.id for t in trajs), "each trajectory trained exactly once"
    assert [rec["step"] for rec in state["history"]] == list(range(STEPS))
    versions = [rec["version"] for rec in state["history"]]
    assert versions == sorted(set(versions)) and state["version"] == version >= STEPS
    assert (run_dir / "final" / "config.json").exists()
    assert updates and updates[-1].version == version


async def publish(bus: Bus, trajs: list[Trajectory]) -> None:
    await bus.publish_many(bus.subjects.traj, trajs, msg_ids=[t.id for t in trajs])
