"""`agentrl learner` with ``learner.backend=megatron`` on a real nats-server, SIGKILLed mid-run and restarted:
every trajectory is trained exactly once, versions stay monotonic, the final HF checkpoint is exported."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path

import pytest

from agentrl.bus import Bus
from tests.fixtures.learner import synth_trajectories
from tests.integration.test_learner_restart import learner_cmd, publish, run_until

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.slow

STEPS = 6


async def test_megatron_learner_killed_and_restarted_trains_each_trajectory_once(
    nats_url: str, run_name: str, tiny_qwen2_dir: Path, tmp_path: Path
) -> None:
    trajs = synth_trajectories(num_groups=STEPS, group_size=2, seed=5)
    run_dir = tmp_path / "run"
    cmd = learner_cmd(nats_url, run_name, tiny_qwen2_dir, run_dir)
    cmd[cmd.index("--max-steps") + 1] = str(STEPS)
    cmd += ["--set", "learner.backend=megatron", "--set", "learner.megatron.timeout_s=120"]
    log = tmp_path / "learner.log"
    async with await Bus.connect(nats_url, run=run_name) as bus:
        await publish(bus, trajs)
        first = await asyncio.to_thread(run_until, cmd, run_dir, 2, log)
        assert 2 <= first < STEPS, log.read_text()[-3000:]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = await asyncio.to_thread(subprocess.run, cmd, env=env, capture_output=True, timeout=240)
        assert done.returncode == 0, done.stderr.decode()[-3000:]
        version = await bus.get_version()
    ckpt = run_dir / "checkpoints"
    state = json.loads((ckpt / (ckpt / "LATEST").read_text() / "state.json").read_text())
    assert sorted(t for rec in state["history"] for t in rec["trained"]) == sorted(t.id for t in trajs)
    assert [rec["step"] for rec in state["history"]] == list(range(STEPS))
    assert state["version"] == version >= STEPS
    assert (ckpt / (ckpt / "LATEST").read_text() / "megatron.json").exists()  # the megatron backend's state
    assert (run_dir / "final" / "model.safetensors").exists()
