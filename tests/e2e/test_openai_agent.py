"""A shortened quickstart trained with an agent written with the plain ``openai`` client
(``worker.agent: agents.openai_agent:run_episode``), through the worker's recording proxy.

What it shows: the run completes every learner step on the proxy's trajectories, and their trained tokens are
exactly what the engine sampled — for every token the SFT policy (version 0) sampled, the logprob the engine
reported equals the logprob the model gives that token after the trajectory's prefix (a prefix that differed
from what the engine consumed, or a re-tokenised reply, would not match). Whether the reward rises is the
quickstart's business (tests/e2e/test_run.py); three steps of a one-epoch SFT model are for the machinery.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.e2e.test_run import _kill_leftover_runs, actor_pids, rows, start_run  # noqa: F401
from tests.faults.harness import finish

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

STEPS = 3


def _export(run_dir: Path, out: Path) -> list[dict[str, Any]]:
    subprocess.run([sys.executable, "-m", "agentrl.cli", "export", str(run_dir), "-o", str(out)], check=True,
                   capture_output=True, timeout=120)
    return rows(out)


def _policy_logprobs(model: torch.nn.Module, tokens: list[int]) -> np.ndarray:
    """log p(token i | tokens before i) under ``model`` at temperature 1, for i >= 1."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens])).logits[0, :-1].float()
    lp = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(tokens[1:])[:, None])[:, 0]
    return np.concatenate([[0.0], lp.numpy()])


def test_openai_client_agent_trains_on_exactly_the_engine_tokens(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = finish(start_run(tmp_path, f"training.max_steps={STEPS}", "controller.eval.at_start=false",
                           "worker.agent=agents.openai_agent:run_episode"), timeout=600)
    run_dir = tmp_path / "quickstart"
    learner = [r for r in rows(run_dir / "learner_metrics.jsonl") if "learner/step" in r]
    assert [r["learner/step"] for r in learner] == list(range(1, STEPS + 1)), out[-3000:]
    assert actor_pids(run_dir) == []
    trajectories = [t for t in _export(run_dir, tmp_path / "traj.jsonl") if t["status"] in ("completed", "truncated")]
    assert len(trajectories) >= STEPS * 16
    model = AutoModelForCausalLM.from_pretrained(run_dir / "sft", torch_dtype=torch.float32).eval()
    checked = 0
    for t in trajectories:
        tokens, mask = list(t["tokens"]), np.array(t["loss_mask"])
        versions, logprobs = np.array(t["versions"]), np.array(t["logprobs"])
        model_turns = [u for u in t["turns"] if u["kind"] == "model"]
        assert mask.sum() == sum(u["end"] - u["start"] for u in model_turns) > 0  # only replies are trained
        v0 = (mask == 1) & (versions == 0)
        if v0.any():
            np.testing.assert_allclose(logprobs[v0], _policy_logprobs(model, tokens)[v0], atol=5e-4)
            checked += int(v0.sum())
    assert checked > 200, checked  # the first batches are all sampled by version 0
