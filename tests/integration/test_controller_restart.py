"""Kill the controller process (SIGKILL) mid-run and start it again: no task is re-issued or lost."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from agentrl.bus import Bus

pytestmark = pytest.mark.slow


def controller_proc(config: Path, url: str, log: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "agentrl.cli", "controller", "--config", str(config), "--nats", url, "--exit-when-done"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(argv, stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env)


async def test_killed_controller_resumes_without_reissuing_or_losing(
    bus: Bus, nats_url: str, run_name: str, tmp_path: Path, start_rollout: Any
) -> None:
    prompts, n, batch, eta = 16, 2, 4, 1
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": [11 + i, 12, 13, 14], "id": i}) + "\n" for i in range(prompts)))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"name": run_name, "dir": str(tmp_path / "run"), "controller": {
        "dataset": {"path": str(data)}, "group_size": n, "batch_size": batch, "max_staleness": eta,
        "epochs": 1, "metrics_interval_s": 0.5,
    }}))
    log = tmp_path / "controller.log"
    steps = prompts * n // batch
    delivered: list[tuple[str, int, int]] = []
    async with start_rollout(bus, batch=batch, eta=eta, steps=steps, slots=4, median=25.0, train_s=0.1) as r:
        original = r.worker._run_agent

        async def recording(task: Any, running: Any) -> Any:
            delivered.append((task.id, task.attempt, task.metadata["row"]))
            return await original(task, running)

        r.worker._run_agent = recording
        proc = controller_proc(config, nats_url, log)
        learning = asyncio.create_task(r.learner.run())
        try:
            while r.learner.version < 2:  # kill it mid-run, with tasks in flight and more to issue
                assert proc.poll() is None, log.read_text()
                await asyncio.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            killed_at = len({d[0] for d in delivered})
            await asyncio.sleep(1.0)
            proc = controller_proc(config, nats_url, log)
            stats = await asyncio.wait_for(learning, timeout=120)
            assert await asyncio.to_thread(proc.wait, 60) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    assert killed_at < prompts * n  # the kill happened before everything was issued
    firsts = [tid for tid, attempt, _ in delivered if attempt == 0]
    assert len(firsts) == len(set(firsts)) == prompts * n, "a task was re-issued or lost"
    assert sorted(stats.trained) == sorted(firsts)  # each trained exactly once
    rows = sorted(row for tid, attempt, row in delivered if attempt == 0 and tid.endswith("-0"))
    assert rows == list(range(prompts))  # every prompt issued as exactly one group
    assert max(stats.staleness) <= eta
    assert "resuming from saved state" in log.read_text()
