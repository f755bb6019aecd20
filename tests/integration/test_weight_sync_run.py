"""``agentrl run`` with ``learner.weight_sync: distributed``: a shortened quickstart with two engines gets every
version by gloo broadcast from the learner (the controller telling both engines to receive it), and finishes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

STEPS = 3
SHORT = [
    "launch.steps=[{name: data, argv: ['{python}', -m, envs.quickstart, --out, '{run_dir}/data', --train, '400',"
    " --eval, '16', --demos, '128', --seed, '0']},"
    " {name: model, argv: [agentrl, model, init, '{run_dir}/base', --hidden-size, '64', --layers, '2',"
    " --vocab-size, '512', --max-positions, '512']},"
    " {name: sft, argv: [agentrl, sft, --config, '{config}', --model, '{run_dir}/base', --data,"
    " '{run_dir}/data/sft.jsonl', --output, '{run_dir}/sft', --epochs, '1']}]",
    "training.batch_size=16", "training.group_size=4", f"training.max_steps={STEPS}", "controller.max_new_tokens=24",
    "controller.eval.interval=3", "controller.eval.max_prompts=8", "engine.max_running=32", "launch.grace_s=5",
    "launch.engines=2", "learner.weight_sync=distributed", "learner.weight_group.timeout_s=30",
    # the learner forms the group through the engines' admin endpoint; agentrl run hands the run's admin key to
    # the controller and workers only, so this run names one for everybody
    "engine.admin_api_key=weight-sync-test", "engine.client.admin_api_key=weight-sync-test",
]


def test_quickstart_with_two_engines_syncs_weights_by_broadcast(tmp_path: Path) -> None:
    args = [a for o in [*SHORT, f"dir={tmp_path}/{{name}}"] for a in ("--set", o)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "agentrl.cli", "run", str(REPO / "configs/quickstart.yaml"), *args],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        out = proc.communicate(timeout=540)[0].decode()
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"run did not finish:\n{proc.communicate()[0].decode()[-4000:]}")
    assert proc.returncode == 0, out[-4000:]
    logs = tmp_path / "quickstart" / "logs"
    learner = (logs / "learner.log").read_text()
    assert len(re.findall(r"weights v\d+ broadcast to 2 engines", learner)) == STEPS, learner[-3000:]
    for i in range(2):
        engine = (logs / f"engine-{i}.log").read_text()
        received = re.findall(r"weights updated from group '[^']+' \(\d+ tensors\), version (\d+)", engine)
        assert received == [str(v) for v in range(1, STEPS + 1)], engine[-3000:]
    assert "did not receive weights" not in (logs / "controller.log").read_text()
