"""Faults of the supervisor itself: kill -9 (actors die with it, a rerun resumes), a second supervisor on the
same run directory (refused), and Ctrl-C during the SFT warm-up and during RL (prompt exit 130)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.faults.harness import (
    REPO,
    check_invariants,
    finish,
    learner_step,
    overrides,
    run_processes,
    start_run,
    wait_for,
    wait_until_gone,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_killed_supervisor_takes_its_actors_along_and_a_rerun_resumes(prepared: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "quickstart"
    steps = 16  # long enough to be killed in the middle
    first = start_run(tmp_path, *overrides(prepared, steps))
    try:
        wait_for(lambda: learner_step(run_dir) >= 1, first, "learner step 1")
        second = start_run(tmp_path, *overrides(prepared, steps))  # same run directory, while the first one runs
        out = finish(second, timeout=60)
        assert second.returncode == 1 and "is in use by processes" in out, out[-3000:]
        wait_for(lambda: learner_step(run_dir) >= 2, first, "learner step 2")
        alive = " ".join(run_processes(run_dir).values())
        assert all(word in alive for word in ("nats-server", " engine ", " envd ", " worker ", " learner "))
        os.killpg(first.pid, signal.SIGKILL)  # the supervisor (and nothing else: actors have their own sessions)
        first.wait()
        killed_at = learner_step(run_dir)
        assert wait_until_gone(run_dir, timeout=15) == {}
    finally:
        for pid in run_processes(run_dir):
            os.kill(pid, signal.SIGKILL)
    assert killed_at < steps
    rerun = start_run(tmp_path, *overrides(prepared, steps))
    out = finish(rerun, timeout=300)
    assert rerun.returncode == 0, out[-5000:]
    check_invariants(run_dir, steps)
    assert wait_until_gone(run_dir) == {}


def _sft_steps(prepared: Path, epochs: int) -> str:
    return ("launch.steps=[{name: sft, argv: [agentrl, sft, --config, '{config}', --model, "
            f"'{prepared}/base', --data, '{prepared}/data/sft.jsonl', --output, '{{run_dir}}/sft2', --epochs, "
            f"'{epochs}']}}]")


def _interrupt(proc: subprocess.Popen[bytes], timeout: float = 30) -> tuple[str, float]:
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)  # what Ctrl-C in its terminal sends it
    out = finish(proc, timeout=timeout)
    return out, time.monotonic() - t0


def test_ctrl_c_during_the_sft_warm_up_exits_130_promptly(prepared: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "quickstart"
    proc = start_run(tmp_path, *overrides(prepared), _sft_steps(prepared, epochs=50))
    try:
        wait_for(lambda: _sft_running(run_dir), proc, "the SFT step", timeout=120)
        time.sleep(3.0)  # into its training loop
        out, took = _interrupt(proc)
    finally:
        for pid in run_processes(run_dir):
            os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 130, out[-3000:]
    assert took < 15 and "stopped before it completed" in out
    assert wait_until_gone(run_dir) == {}


def test_ctrl_c_during_rl_exits_130_and_names_the_last_weights(prepared: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "quickstart"
    proc = start_run(tmp_path, *overrides(prepared, steps=200), "launch.grace_s=20")  # the learner exports last/
    try:
        wait_for(lambda: learner_step(run_dir) >= 1, proc, "learner step 1")
        out, took = _interrupt(proc)
    finally:
        for pid in run_processes(run_dir):
            os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 130, out[-3000:]
    assert took < 30 and "stopped before it completed" in out
    assert f"last weights (the run was stopped, this is not the final model): {run_dir / 'last'}" in out
    assert "final model (" not in out and not (run_dir / "final").exists()
    assert wait_until_gone(run_dir) == {}


def test_ctrl_c_of_agentrl_sft_alone_exits_130(prepared: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "agentrl.cli", "sft", "--config", str(REPO / "configs/quickstart.yaml"), "--set",
           f"dir={tmp_path}/run", "--model", str(prepared / "base"), "--data", str(prepared / "data/sft.jsonl"),
           "--output", str(tmp_path / "out"), "--epochs", "50"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    time.sleep(8)  # past start-up, into the training loop
    out, took = _interrupt(proc)
    assert proc.returncode == 130 and took < 10, out[-3000:]


def _sft_running(run_dir: Path) -> bool:
    return any(" sft " in line for line in run_processes(run_dir).values())
