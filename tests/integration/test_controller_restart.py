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
from agentrl.messages import decode

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
    config.write_text(yaml.safe_dump({
        "name": run_name, "dir": str(tmp_path / "run"),
        "training": {"group_size": n, "batch_size": batch, "max_staleness": eta},
        "controller": {"dataset": {"path": str(data)}, "epochs": 1, "metrics_interval_s": 0.5},
    }))
    log = tmp_path / "controller.log"
    steps = prompts * n // batch
    delivered: list[tuple[str, int, int]] = []
    async with start_rollout(bus, batch=batch, eta=eta, steps=steps, slots=4, median=25.0, train_s=0.1) as r:
        original = r.worker._run_agent

        async def recording(task: Any, running: Any, env: Any) -> Any:
            delivered.append((task.id, task.attempt, task.metadata["row"]))
            return await original(task, running, env)

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


async def learn_then_controller_exits(learner: Any, procs: list[subprocess.Popen[bytes]], log: Path,
                                      wait_s: float) -> Any:
    """Run the learner to its last step, then the last controller must exit cleanly within ``wait_s``; every
    controller process is gone afterwards."""
    try:
        stats = await asyncio.wait_for(learner.run(), timeout=180)
        code = await asyncio.to_thread(procs[-1].wait, wait_s)
        assert code == 0, await asyncio.to_thread(log.read_text)
        return stats
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


async def tap_admissions(bus: Bus, into: dict[str, Any]) -> Any:
    """Record every training task the controller publishes, first sighting only, in order (a core-NATS tap:
    it sees publishes without consuming from the work queue)."""
    from agentrl.messages import Task

    async def on_task(msg: Any) -> None:
        task = decode(msg.data, Task)
        into.setdefault(task.id, task)

    return await bus.nc.subscribe(bus.subjects.task("new"), cb=on_task)


def one_epoch_run(tmp_path: Path, run_name: str, prompts: int, n: int, batch: int, eta: int) -> tuple[Path, int]:
    """A run config over ``prompts`` prompts for one epoch, and its number of training steps."""
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": [11 + i, 12, 13, 14]}) + "\n" for i in range(prompts)))
    steps = prompts * n // batch
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "name": run_name, "dir": str(tmp_path / "run"),
        "training": {"group_size": n, "batch_size": batch, "max_staleness": eta, "max_steps": steps},
        "controller": {"dataset": {"path": str(data)}, "epochs": 1, "metrics_interval_s": 0.5},
    }))
    return config, steps


async def test_controller_killed_between_batch_taken_and_its_receipt_never_over_admits(
    bus: Bus, nats_url: str, run_name: str, tmp_path: Path, start_rollout: Any
) -> None:
    """The learner's batch_taken (and the weights after it) are published while the controller is dead. They
    are durable, so the restarted controller still counts them: its books match the learner's, and admission
    never exceeds (v + eta + 1) * B at the version each task was admitted at."""
    prompts, n, batch, eta = 20, 2, 4, 1
    config, steps = one_epoch_run(tmp_path, run_name, prompts, n, batch, eta)
    log = tmp_path / "controller.log"
    seen: dict[str, Any] = {}
    await tap_admissions(bus, seen)
    procs = [controller_proc(config, nats_url, log)]
    async with start_rollout(bus, batch=batch, eta=eta, steps=steps, slots=4, median=25.0, train_s=0.1) as r:
        publish = r.learner._control

        async def kill_first(kind: Any, msg: Any, msg_id: str) -> None:
            if kind == "batch_taken" and msg.step in (2, 5):  # the controller dies just before it is sent
                procs[-1].send_signal(signal.SIGKILL)
                procs[-1].wait(timeout=10)
                await publish(kind, msg, msg_id)
                await asyncio.sleep(0.5)
                procs.append(controller_proc(config, nats_url, log))
                return
            await publish(kind, msg, msg_id)

        r.learner._control = kill_first
        stats = await learn_then_controller_exits(r.learner, procs, log, 60)
        from agentrl.controller.state import load_state

        state = await load_state(bus)
        admitted = list(seen.values())
    assert len(procs) == 3 and state is not None
    c = state.counters
    assert c.trained == len(stats.trained) == steps * batch  # every batch_taken counted, also those sent while dead
    assert sum(n for age, n in state.staleness_hist.items()) == c.trained_tokens + c.stale_tokens
    assert len(admitted) == len({t.id for t in admitted}) == prompts * n
    for k, task in enumerate(admitted, start=1):  # accepted + running (no drops here) at each admission
        assert k <= (task.admitted_version + eta + 1) * batch, (k, task.admitted_version)


async def test_a_batch_taken_handed_to_the_dead_controller_is_still_counted(
    bus: Bus, nats_url: str, run_name: str, tmp_path: Path, start_rollout: Any
) -> None:
    """The controller dies holding a batch_taken it was handed but never acked (played here by a client that
    pulls it and goes silent). NATS gives it to the restarted controller only after ack_wait, after the learner's
    last batch_taken: the controller must not close its books before it is counted (it used to exit one step
    short, as the fault matrix's nats-server/controller case once showed)."""
    prompts, n, batch, eta = 12, 2, 4, 1
    config, steps = one_epoch_run(tmp_path, run_name, prompts, n, batch, eta)
    log = tmp_path / "controller.log"
    procs = [controller_proc(config, nats_url, log)]
    stream = bus.subjects.control_stream
    async with start_rollout(bus, batch=batch, eta=eta, steps=steps, slots=4, median=25.0, train_s=0.1) as r:
        publish = r.learner._control

        async def die_holding_it(kind: Any, msg: Any, msg_id: str) -> None:
            if kind == "batch_taken" and msg.step == steps - 3:
                procs[-1].send_signal(signal.SIGKILL)
                procs[-1].wait(timeout=10)
                await publish(kind, msg, msg_id)
                held = await bus.js.pull_subscribe_bind(durable="controller-control", stream=stream)
                (handed,) = await held.fetch(1, timeout=5)  # delivered, never acked: what the dead one held
                assert handed.metadata.sequence.stream == (await bus.js.stream_info(stream)).state.last_seq
                procs.append(controller_proc(config, nats_url, log))
                return
            await publish(kind, msg, msg_id)

        r.learner._control = die_holding_it
        stats = await learn_then_controller_exits(r.learner, procs, log, 120)
        from agentrl.controller.state import load_state

        state = await load_state(bus)
    assert len(procs) == 2 and state is not None
    assert state.counters.trained == len(stats.trained) == steps * batch, state.counters
    assert not state.pending_versions
