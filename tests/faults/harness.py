"""Real ``agentrl run`` processes for fault tests: a tiny prepared model, fault injection, and the invariants.

A run here is the quickstart machinery shrunk to seconds: the data, model and SFT checkpoint are made once
per session (:func:`prepare_quickstart`); each run starts every actor as its own process (nats-server,
engine, env worker serving the calculator, agent worker, controller, learner) with fast failure detection.
:func:`check_invariants` reads the learner's last checkpoint, the controller's counters and every stored
trajectory (from the run's JetStream store) and asserts what the fault matrix promises.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from agentrl.bus import Bus, EmbeddedNats
from agentrl.messages import Trajectory, decode

REPO = Path(__file__).resolve().parents[2]
BATCH = 8
STEPS = 6
ACTOR_WORDS = ("engine", "envd", "worker", "controller", "learner")


def _cli(*args: str, cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          check=False, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


def prepare_quickstart(root: Path) -> Path:
    """Task data, a tiny model and one SFT epoch on demonstrations, as the quickstart's steps make them."""
    _cli("envs.quickstart", "--out", str(root / "data"), "--train", "400", "--eval", "8", "--demos", "128",
         "--seed", "0", cwd=root)
    _cli("agentrl.cli", "model", "init", str(root / "base"), "--hidden-size", "64", "--layers", "2",
         "--vocab-size", "512", "--max-positions", "512", cwd=root)
    _cli("agentrl.cli", "sft", "--config", str(REPO / "configs/quickstart.yaml"), "--set", f"dir={root}/run",
         "--model", str(root / "base"), "--data", str(root / "data/sft.jsonl"), "--output", str(root / "sft"),
         "--epochs", "1", cwd=root)
    return root


def overrides(prepared: Path, steps: int = STEPS) -> list[str]:
    """A tiny run of the prepared model: remote calculator env, fast health checks and retries."""
    return [
        "launch.steps=[]", f"engine.model={prepared}/sft", f"learner.model={prepared}/sft",
        f"controller.dataset.path={prepared}/data/train.jsonl", "controller.eval.dataset=null",
        f"training.batch_size={BATCH}", "training.group_size=4", f"training.max_steps={steps}",
        "controller.max_new_tokens=16", "engine.max_running=16",
        "worker.envs={}", "worker.remote_envs=[calculator]", "launch.envd=1",
        "envd.envs={calculator: {factory: 'envs.calculator:CalculatorEnv', args: {advertise_tools: false}}}",
        "launch.grace_s=3", "launch.health_interval_s=1", "launch.health_failures=3", "launch.hang_timeout_s=6",
        "engine.client.health_interval_s=1", "worker.env_call_timeout_s=5", "envd.call_timeout_s=5",
        "worker.infra_backoff_s=0.5", "worker.infra_retries=6", "nats.ack_wait_s=10", "learner.batch.ack_wait_s=10",
        "launch.max_restarts=3",
    ]


def start_run(cwd: Path, *extra: str) -> subprocess.Popen[bytes]:
    args = [a for o in (f"dir={cwd}/{{name}}", *extra) for a in ("--set", o)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "agentrl.cli", "run", str(REPO / "configs/quickstart.yaml"), *args],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """Wait for the run; its output (the run is killed, and the test fails, if it takes too long)."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:  # an actor outliving the supervisor still holds the pipe
            out = b"(no output: the run's pipe stayed open after the supervisor was killed)"
        raise AssertionError(f"run did not finish in {timeout}s:\n{out.decode()[-5000:]}") from None
    return out.decode()


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def run_processes(run_dir: Path) -> dict[int, str]:
    """Live processes of a run (pid -> command line): actors name its config, nats-server its config file."""
    markers = (str(run_dir / "config.yaml"), str(run_dir / "nats" / "nats-server.conf"))
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            line = cmdline(int(entry.name))
            if any(m in line for m in markers) and _state(int(entry.name)) != "Z":
                found[int(entry.name)] = line
    return found


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


def actor_pid(run_dir: Path, actor: str) -> int:
    """The pid of one live actor: ``nats``, ``engine``, ``envd``, ``worker``, ``controller`` or ``learner``."""
    for pid, line in run_processes(run_dir).items():
        if (actor == "nats" and "nats-server" in line) or f" agentrl.cli {actor} " in line:
            return pid
    raise AssertionError(f"no live {actor} in {sorted(run_processes(run_dir).values())}")


def learner_step(run_dir: Path) -> int:
    metrics = run_dir / "learner_metrics.jsonl"
    if not metrics.is_file():
        return 0
    steps = [int(json.loads(line).get("learner/step", 0)) for line in metrics.read_text().splitlines()
             if line.strip().startswith("{") and line.strip().endswith("}")]
    return max(steps, default=0)


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen[bytes], what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended while waiting for {what}:\n{proc.communicate()[0].decode()[-5000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def wait_until_gone(run_dir: Path, timeout: float = 15) -> dict[int, str]:
    deadline = time.monotonic() + timeout
    while (left := run_processes(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def stored_trajectories(run_dir: Path, run: str = "quickstart") -> dict[str, Trajectory]:
    """Every trajectory in the run's stream, read from its JetStream store after the run (id -> last copy)."""
    async def read() -> dict[str, Trajectory]:
        server = EmbeddedNats(run_dir / "nats", log_path=run_dir / "nats" / "reader.log")
        async with server, await Bus.connect(server.url, run, ensure=False) as bus:
            stream = bus.subjects.traj_stream
            last = (await bus.js.stream_info(stream)).state.last_seq
            out = {}
            for seq in range(1, last + 1):
                msg = await bus.js.get_msg(stream, seq)
                traj = decode(msg.data or b"", Trajectory)
                out[traj.id] = traj
            return out

    return asyncio.run(read())


def check_invariants(run_dir: Path, steps: int = STEPS) -> None:
    """The run completed every step; every trained task once; nothing failed or empty trained; none lost."""
    latest = (run_dir / "checkpoints" / "LATEST").read_text().strip()
    state = json.loads((run_dir / "checkpoints" / latest / "state.json").read_text())
    assert state["step"] == steps
    trained = state["consumed"]
    tasks = [tid.rsplit("-", 1)[0] for tid in trained]
    assert len(trained) == len(set(tasks)) == steps * BATCH, "a task was trained twice or a step was short"
    stored = stored_trajectories(run_dir)
    missing = [t for t in trained if t not in stored]
    assert not missing, f"trained trajectories missing from the stream: {missing[:5]}"
    bad = {t: stored[t].status for t in trained if stored[t].status not in ("completed", "truncated")}
    assert not bad, f"trained trajectories that are not policy outcomes: {bad}"
    empty = [t for t in trained if int(np.asarray(stored[t].loss_mask).sum()) == 0]
    assert not empty, f"trained trajectories without trainable tokens: {empty}"
    counters = [json.loads(line) for line in (run_dir / "controller_metrics.jsonl").read_text().splitlines()
                if '"controller/admitted"' in line]
    last = counters[-1]
    assert last["controller/trained"] == steps * BATCH
    assert last["controller/admitted"] == last["controller/finished"], "admitted tasks never finished (lost)"
