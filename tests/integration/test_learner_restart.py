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
from agentrl.config.learner import BatchConfig, LearnerConfig
from agentrl.config.training import TrainingConfig
from agentrl.messages import BatchTaken, Trajectory, WeightUpdate, decode
from tests.fixtures.learner import synth_trajectories
from trainer.backend.torch_backend import build_torch_backend
from trainer.bus_adapter import BusLink, open_trajectory_consumer
from trainer.checkpoint import Checkpointer, LearnerState
from trainer.learner import Learner
from trainer.metrics import MetricsSink
from trainer.weights import DiskWeightSink

pytestmark = pytest.mark.slow

STEPS = 16  # 32 trajectories in groups of 2, 2 per step


def learner_cmd(url: str, run: str, model: Path, run_dir: Path) -> list[str]:
    sets = {
        "dir": str(run_dir), "learner.device": "cpu", "learner.torch_threads": 1, "learner.optim.lr": 1e-3,
        "training.batch_size": 2, "training.group_size": 2, "learner.keep_checkpoints": 2,
        "training.max_staleness": 100,  # every trajectory is trainable however late it arrives
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

        await bus.nc.subscribe(bus.subjects.control("weights"), cb=on_weights)
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


class Crash(Exception):
    """Stands in for a kill at a precise point of the step."""


class CrashingCheckpointer(Checkpointer):
    def __init__(self, root: Path, step: int, when: str) -> None:
        super().__init__(root)
        self.crash_step, self.when = step, when

    def save(self, backend, state):  # type: ignore[no-untyped-def]
        if state.step == self.crash_step and self.when == "before checkpoint":
            raise Crash(self.when)  # weights published and version bumped, nothing committed
        path = super().save(backend, state)
        if state.step == self.crash_step and self.when == "after checkpoint":
            raise Crash(self.when)  # committed, nothing acked
        return path


TRAINING = TrainingConfig(batch_size=2, group_size=2, max_staleness=100, max_steps=4)


async def run_learner(url: str, run: str, cfg: LearnerConfig, tmp: Path, ckpt: Checkpointer) -> LearnerState:
    async with await Bus.connect(url, run=run) as bus:
        learner = Learner(cfg, TRAINING, build_torch_backend(cfg), await open_trajectory_consumer(bus, cfg), BusLink(bus),
                          DiskWeightSink(tmp / "weights"), ckpt, MetricsSink(tmp / "metrics.jsonl", bus))
        return await learner.run()


@pytest.mark.parametrize(("when", "every"), [("before checkpoint", 1), ("after checkpoint", 1), ("before checkpoint", 2)])
async def test_crash_at_the_edges_of_the_commit_trains_each_trajectory_once(
    nats_url: str, run_name: str, tiny_qwen2_dir: Path, tmp_path: Path, when: str, every: int
) -> None:
    trajs = synth_trajectories(num_groups=4, group_size=2, seed=4)
    cfg = LearnerConfig(model=str(tiny_qwen2_dir), device="cpu", checkpoint_every=every,
                        batch=BatchConfig(ack_wait_s=1.0))
    async with await Bus.connect(nats_url, run=run_name) as bus:
        await publish(bus, trajs[:6])
    with pytest.raises(Crash):
        await run_learner(nats_url, run_name, cfg, tmp_path, CrashingCheckpointer(tmp_path / "ckpt", 2, when))
    async with await Bus.connect(nats_url, run=run_name) as bus:
        await publish(bus, trajs[6:])  # arrives while the crashed learner's deliveries wait out their ack_wait
    state = await run_learner(nats_url, run_name, cfg, tmp_path, Checkpointer(tmp_path / "ckpt"))
    trained = [tid for rec in state.history for tid in rec.trained]
    assert sorted(trained) == sorted(t.id for t in trajs)
    assert state.step == 4
    async with await Bus.connect(nats_url, run=run_name) as bus:
        # A crash after the version bump leaves the bus one version ahead; the restarted learner continues from it.
        lost = 0 if when == "after checkpoint" else every
        assert await bus.get_version() == state.version == 4 + lost
        info = await bus.js.consumer_info(bus.subjects.traj_stream, "learner")
        announced = await announced_tasks(bus)
    assert info.num_ack_pending == 0 and info.num_pending == 0
    # the controller's books: every task the final history trained was announced to it (a redone step takes
    # other trajectories than the lost one, and its announcement must not be deduplicated away)
    assert {t.task_id for t in trajs} <= announced


async def announced_tasks(bus: Bus) -> set[str]:
    """Task ids of every ``BatchTaken`` on the run's durable control stream."""
    stream = bus.subjects.control_stream
    last = (await bus.js.stream_info(stream)).state.last_seq
    out: set[str] = set()
    for seq in range(1, last + 1):
        msg = await bus.js.get_msg(stream, seq)
        if msg.subject == bus.subjects.control("batch_taken"):
            out |= set(decode(msg.data or b"", BatchTaken).task_ids)
    return out


def test_sigterm_stops_the_learner_cleanly(nats_url: str, run_name: str, tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = learner_cmd(nats_url, run_name, tiny_qwen2_dir, run_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = tmp_path / "learner.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while b"learner ready" not in log.read_bytes() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # while it waits for trajectories
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert (run_dir / "last" / "config.json").exists()  # stopped early: not presented as the final model
    assert not (run_dir / "final").exists()
