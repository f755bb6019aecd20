"""`agentrl worker` as its own process: config wiring, engine router, tokenizer, bus; clean SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import pytest

from agentrl.bus import Bus
from agentrl.messages import ChatMessage, SamplingParams, Task, Trajectory

pytestmark = pytest.mark.slow


async def test_worker_process_runs_a_task_and_stops_on_sigterm(
    bus: Bus, nats_url: str, run_name: str, engine_url: str, tiny_model_dir: Path
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agentrl.cli", "worker", "--nats", nats_url, "--run", run_name,
        "--engine-url", engine_url, "--agent", "agents.tool_agent:run_episode", "--concurrency", "4",
        "--set", f"worker.tokenizer={tiny_model_dir}", "--set", "worker.envs.echo=tests.fixtures.envs:EchoEnv",
        "--set", "worker.poll_timeout_s=0.2",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(60):
            while b"ready" not in (line := await proc.stdout.readline()):
                assert line, "worker exited before it was ready"
        task = Task(id="cli", group_id="g", prompt=[ChatMessage(role="user", content="hi")], env="echo",
                    sampling=SamplingParams(max_new_tokens=8))
        await bus.publish(bus.subjects.task("new"), task, msg_id=task.id)
        consumer = await bus.consumer(bus.subjects.traj, durable="cli-reader", typ=Trajectory)
        async with asyncio.timeout(60):
            while not (found := await consumer.fetch(batch=1, timeout=1.0)):
                pass
        await consumer.unsubscribe()
        t = found[0].msg
        assert t.id == "cli-0" and t.status in ("completed", "truncated") and t.num_trained_tokens > 0
        assert t.worker_id and t.engine_id
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            output = await proc.stdout.read()
            assert await proc.wait() == 0, output.decode()[-2000:]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
