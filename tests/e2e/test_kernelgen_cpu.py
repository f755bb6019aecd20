"""`agentrl run configs/kernelgen-cpu.yaml`, shortened: the whole kernel-generation pipeline on CPU — template
data, the dataset step, a code-trained tokenizer, SFT, then multi-turn RL with every attempt evaluated in a
sandboxed Triton-interpreter subprocess — for the machinery, not for learning (bench/kernelgen_cpu.py measures
that)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]
pytest.importorskip("triton")

STEPS = 2
SHORT = [
    "launch.steps=[{name: data, argv: ['{python}', -m, envs.kernelgen.templates, --out, '{run_dir}/data', --train,"
    " '16', --eval, '4', --demos, '64', --seed, '{seed}']},"
    " {name: train-tasks, argv: ['{python}', -m, envs.kernelgen.dataset, --problems, '{run_dir}/data/problems/train',"
    " --out, '{run_dir}/data/train.jsonl', --instructions, short, --max-turns, '2']},"
    " {name: eval-tasks, argv: ['{python}', -m, envs.kernelgen.dataset, --problems, '{run_dir}/data/problems/eval',"
    " --out, '{run_dir}/data/eval.jsonl', --instructions, short, --max-turns, '2']},"
    " {name: model, argv: [agentrl, model, init, '{run_dir}/base', --corpus, '{run_dir}/data/corpus.jsonl',"
    " --hidden-size, '64', --layers, '2', --vocab-size, '512', --max-positions, '1024']},"
    " {name: sft, argv: [agentrl, sft, --config, '{config}', --model, '{run_dir}/base', --data,"
    " '{run_dir}/data/sft.jsonl', --output, '{run_dir}/sft', --epochs, '1', --set, learner.sft_batch_size=16]}]",
    "training.batch_size=8", f"training.max_steps={STEPS}", "controller.max_new_tokens=160", "launch.grace_s=5",
]


def test_shortened_kernelgen_cpu_run(tmp_path: Path) -> None:
    args = [a for o in [*SHORT, f"dir={tmp_path}/{{name}}"] for a in ("--set", o)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "agentrl.cli", "run", str(REPO / "configs/kernelgen-cpu.yaml"),
                             *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        out = proc.communicate(timeout=400)[0].decode()
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"run did not finish:\n{proc.communicate()[0].decode()[-4000:]}")
    run_dir = tmp_path / "kernelgen-cpu"
    assert proc.returncode == 0, out[-4000:]
    learner = [json.loads(line) for line in (run_dir / "learner_metrics.jsonl").read_text().splitlines()]
    assert [r["learner/step"] for r in learner if "learner/step" in r] == list(range(1, STEPS + 1)), out[-3000:]
    evals = [json.loads(line) for line in (run_dir / "controller_metrics.jsonl").read_text().splitlines()]
    versions = [r["controller/eval/version"] for r in evals if "controller/eval/accuracy" in r]
    assert versions[0] == 0 and versions[-1] == STEPS, evals[-3:]
    assert "eval accuracy (held-out, greedy): " in out
    worker_log = (run_dir / "logs" / "worker-0.log").read_text()
    assert "Traceback" not in worker_log, worker_log[-3000:]
    assert (run_dir / "final" / "config.json").is_file()
