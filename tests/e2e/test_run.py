"""`agentrl run` end to end: every actor as its own process, a shortened quickstart."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.harness import finish

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

BATCH = 16
LEARN_STEPS = 20

SHORT = [
    # a smaller model, fewer demonstrations and one SFT epoch: for the test of the machinery, not of learning
    "launch.steps=[{name: data, argv: ['{python}', -m, envs.quickstart, --out, '{run_dir}/data', --train, '400',"
    " --eval, '16', --demos, '128', --seed, '0']},"
    " {name: model, argv: [agentrl, model, init, '{run_dir}/base', --hidden-size, '64', --layers, '2',"
    " --vocab-size, '512', --max-positions, '512']},"
    " {name: sft, argv: [agentrl, sft, --config, '{config}', --model, '{run_dir}/base', --data,"
    " '{run_dir}/data/sft.jsonl', --output, '{run_dir}/sft', --epochs, '1']}]",
    f"training.batch_size={BATCH}", "training.group_size=4",
    "controller.max_new_tokens=24", "controller.eval.interval=3", "controller.eval.max_prompts=8",
    "engine.max_running=32", "launch.grace_s=5",
]


_STARTED: list[subprocess.Popen[bytes]] = []


@pytest.fixture(autouse=True)
def _kill_leftover_runs() -> Iterator[None]:
    """Whatever ends a test (a failure, pytest's timeout), its `agentrl run` and every actor go with it."""
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def start_run(tmp_path: Path, *extra: str, short: bool = True) -> subprocess.Popen[bytes]:
    overrides = [*(SHORT if short else []), f"dir={tmp_path}/{{name}}", *extra]
    args = [a for o in overrides for a in ("--set", o)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "agentrl.cli", "run", str(REPO / "configs/quickstart.yaml"), *args],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    _STARTED.append(proc)
    return proc


def rows(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def actor_pids(run_dir: Path) -> list[int]:
    """Processes whose command line names this run's resolved config (the actors)."""
    marker = str(run_dir / "config.yaml")
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and marker in cmdline(int(entry.name)):
            pids.append(int(entry.name))
    return pids


# The quickstart's own preparation (data, model, SFT) and RL, shortened to 20 steps: enough for the reward
# and the held-out accuracy to rise (the full run takes them from ~0 to ~75% in 40 steps).
LEARN = [f"training.max_steps={LEARN_STEPS}", "controller.eval.interval=10",
         "controller.eval.max_prompts=32", "launch.grace_s=5"]


def test_shortened_quickstart_learns_within_the_staleness_bound_and_stops_cleanly(tmp_path: Path) -> None:
    out = finish(start_run(tmp_path, *LEARN, short=False), timeout=1200)
    run_dir = tmp_path / "quickstart"
    learner = [r for r in rows(run_dir / "learner_metrics.jsonl") if "learner/step" in r]
    assert [r["learner/step"] for r in learner] == list(range(1, LEARN_STEPS + 1)), out[-3000:]
    # the staleness bound (eta = 1) held for every trained token; older sampled tokens were counted and masked
    for r in learner:
        assert r["learner/staleness/trained_max"] <= 1
        over = sum(v for k, v in r["learner/staleness/hist"].items() if int(k) > 1)  # type: ignore[union-attr]
        assert r["learner/staleness/over_bound_tokens"] == over == r["learner/staleness/masked_tokens"]
    # the reward went up: the last five steps against the first five, and held-out greedy accuracy
    reward = [float(r["learner/reward/mean"]) for r in learner]  # type: ignore[arg-type]
    assert sum(reward[-5:]) / 5 > sum(reward[:5]) / 5 + 0.15, reward
    evals = [(r["controller/eval/version"], r["controller/eval/accuracy"])
             for r in rows(run_dir / "controller_metrics.jsonl") if "controller/eval/accuracy" in r]
    assert evals[0][0] == 0 and evals[-1][0] == LEARN_STEPS, evals  # the start and the final policy
    assert evals[-1][1] >= evals[0][1] + 0.3, evals  # type: ignore[operator]
    assert "eval accuracy (held-out, greedy): " in out
    assert (run_dir / "final" / "config.json").is_file() and (run_dir / "config.yaml").is_file()
    assert {p.name for p in (run_dir / "plots").iterdir()} >= {"reward.png", "eval_accuracy.png", "staleness.png"}
    assert {p.name for p in (run_dir / "logs").iterdir()} >= {"engine-0.log", "worker-0.log", "controller.log",
                                                             "learner.log", "step-sft.log"}
    assert actor_pids(run_dir) == []


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    metrics = run_dir / "learner_metrics.jsonl"
    while time.monotonic() < deadline:
        assert proc.poll() is None, "run ended early"
        if metrics.is_file() and any(r.get("learner/step", 0) >= step for r in rows(metrics)):
            return
        time.sleep(0.5)
    pytest.fail(f"learner did not reach step {step} in {timeout}s")


def test_run_survives_killing_a_worker_and_the_engine(tmp_path: Path) -> None:
    steps = 5
    proc = start_run(tmp_path, f"training.max_steps={steps}", "launch.workers=2")
    run_dir = tmp_path / "quickstart"
    wait_for_step(run_dir, 1, proc, timeout=600)
    workers = [p for p in actor_pids(run_dir) if " worker " in cmdline(p)]
    engines = [p for p in actor_pids(run_dir) if " engine " in cmdline(p)]
    assert len(workers) == 2 and len(engines) == 1
    for pid in (workers[0], engines[0]):
        os.kill(pid, signal.SIGKILL)
    out = finish(proc, timeout=900)
    assert proc.returncode == 0, out[-3000:]
    assert "restart 1/3" in out  # the supervisor brought them back
    latest = (run_dir / "checkpoints" / "LATEST").read_text().strip()
    state = json.loads((run_dir / "checkpoints" / latest / "state.json").read_text())
    trained_tasks = [tid.rsplit("-", 1)[0] for rec in state["history"] for tid in rec["trained"]]
    assert len(trained_tasks) == len(set(trained_tasks)) == steps * BATCH  # every task trained once, none lost
    ctrl = [r for r in rows(run_dir / "controller_metrics.jsonl") if "controller/admitted" in r][-1]
    assert ctrl["controller/admitted"] == ctrl["controller/finished"] == steps * BATCH
    assert actor_pids(run_dir) == []
