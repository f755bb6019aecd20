"""The tutorial (docs/tutorial.md), executed: its files written from the page, its run started, its commands run.

Every code block whose first line is ``# file: guess/NAME`` is written to ``guess/NAME``; ``agentrl run guess.yaml``
runs from that folder with smaller preparation steps and three RL steps (this checks that the tutorial's code
works end to end, not that it learns: docs/tutorial.md reports the full run). Then the page's ``agentrl tail``
commands run verbatim against the finished run.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = Path(__file__).resolve().parents[2]
TUTORIAL = REPO / "docs" / "tutorial.md"
pytestmark = pytest.mark.slow

STEPS = 3
SMALLER = [
    "launch.steps=[{name: data, argv: ['{python}', make_data.py, --out, '{run_dir}/data', --train, '64', --eval, '8',"
    " --demos, '200']},"
    " {name: model, argv: [agentrl, model, init, '{run_dir}/base', --hidden-size, '64', --layers, '2',"
    " --max-positions, '512']},"
    " {name: sft, argv: [agentrl, sft, --config, '{config}', --model, '{run_dir}/base', --data,"
    " '{run_dir}/data/sft.jsonl', --output, '{run_dir}/sft', --epochs, '1', --set, learner.optim.lr=3e-3]}]",
    "training.batch_size=16", f"training.max_steps={STEPS}", "controller.eval.interval=3",
    "controller.eval.max_prompts=8", "launch.grace_s=5",
]


def code_blocks(text: str) -> list[tuple[str, str]]:
    return re.findall(r"```(\w*)\n(.*?)```", text, re.S)


def tutorial_files() -> dict[str, str]:
    files = {}
    for _, body in code_blocks(TUTORIAL.read_text()):
        first = body.splitlines()[0]
        if first.startswith("# file: "):
            files[first.removeprefix("# file: ")] = body
    return files


def tutorial_commands(prefix: str) -> list[list[str]]:
    commands = []
    for lang, body in code_blocks(TUTORIAL.read_text()):
        if lang == "bash":
            commands += [shlex.split(line, comments=True) for line in body.splitlines() if line.startswith(prefix)]
    return commands


def scalars(logdir: Path) -> set[str]:
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return set(acc.Tags()["scalars"])


def test_the_page_has_the_four_files_and_its_commands() -> None:
    assert set(tutorial_files()) == {"guess/guess_env.py", "guess/guess_agent.py", "guess/make_data.py", "guess/guess.yaml"}
    assert ["agentrl", "run", "guess.yaml"] in tutorial_commands("agentrl run")
    assert len(tutorial_commands("agentrl tail")) == 2


def test_the_tutorial_trains_its_env_and_agent(tmp_path: Path) -> None:
    for name, body in tutorial_files().items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(body)
    folder = tmp_path / "guess"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    run = [sys.executable, "-m", "agentrl.cli", "run", "guess.yaml", *(a for o in SMALLER for a in ("--set", o))]
    proc = subprocess.run(run, cwd=folder, env=env, capture_output=True, text=True, timeout=420)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "final model (Hugging Face checkpoint): runs/guess/final" in out

    run_dir = folder / "runs" / "guess"
    steps = [json.loads(line) for line in (run_dir / "learner_metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    assert "Starting nats-server" in (run_dir / "logs" / "nats.log").read_text()  # the bus's log beside the others
    learner_log = (run_dir / "logs" / "learner.log").read_text()
    assert f"step {STEPS}, v {STEPS}, reward" in learner_log and "Writing model shards" not in learner_log
    assert {"learner/reward/mean", "learner/loss/total"} <= scalars(run_dir / "tensorboard" / "learner")
    assert "controller/version" in scalars(run_dir / "tensorboard" / "controller")

    tail = subprocess.run([sys.executable, "-m", "agentrl.cli", "tail", "guess", "--no-follow", "--json"], cwd=folder,
                          env=env, capture_output=True, text=True, timeout=120)
    rows = [json.loads(line) for line in tail.stdout.splitlines()]
    assert rows and all(r["env"] == "guess" for r in rows), tail.stderr[-2000:]
    played = [r for r in rows if "guesses" in r.get("metadata", {})]  # ended by the environment's step
    assert played, "no episode reached the environment's end"
    for command in tutorial_commands("agentrl tail"):
        shown = subprocess.run([sys.executable, "-m", "agentrl.cli", *command[1:]], cwd=folder, env=env,
                               capture_output=True, text=True, timeout=120)
        assert shown.returncode == 0, f"{shlex.join(command)}: {shown.stderr[-2000:]}"
