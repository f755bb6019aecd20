"""The training contract: stored once per run, checked by every actor that joins — in process and by hand."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from agentrl.bus import Bus
from agentrl.config.training import TrainingConfig
from agentrl.contract import join_contract
from agentrl.errors import ContractMismatch


async def test_first_actor_stores_the_contract_and_a_disagreeing_one_is_refused(bus: Bus) -> None:
    mine = TrainingConfig(batch_size=8, group_size=4, max_staleness=2, max_steps=10)
    assert await join_contract(bus, mine, actor="controller") == mine
    assert await join_contract(bus, mine, actor="learner") == mine  # the same contract joins (restarts too)
    other = TrainingConfig(batch_size=16, group_size=4, max_staleness=1, max_steps=10)
    with pytest.raises(ContractMismatch) as err:
        await join_contract(bus, other, actor="learner")
    text = str(err.value)
    assert "training.batch_size: the run has 8, this actor has 16" in text
    assert "training.max_staleness: the run has 2, this actor has 1" in text and "max_steps" not in text


async def test_concurrent_joins_agree_on_one_contract(bus: Bus) -> None:
    a, b = TrainingConfig(batch_size=8, group_size=4), TrainingConfig(batch_size=4, group_size=4)
    results = await asyncio.gather(join_contract(bus, a, actor="x"), join_contract(bus, b, actor="y"),
                                   return_exceptions=True)
    assert sum(isinstance(r, ContractMismatch) for r in results) == 1  # exactly one wins the create


@pytest.mark.slow
async def test_an_actor_started_by_hand_with_another_contract_refuses_to_start(
    bus: Bus, nats_url: str, run_name: str, tmp_path: Path
) -> None:
    await join_contract(bus, TrainingConfig(batch_size=8, group_size=4, max_staleness=1), actor="learner")
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "hi"}) + "\n")
    argv = [sys.executable, "-m", "agentrl.cli", "controller", "--nats", nats_url, "--run", run_name,
            "--dataset", str(data), "--set", f"dir={tmp_path}", "--set", "training.batch_size=16",
            "--set", "training.group_size=4", "--set", "training.max_staleness=1"]
    done = await asyncio.to_thread(subprocess.run, argv, capture_output=True, timeout=120)
    assert done.returncode != 0
    out = done.stderr.decode()
    assert "training.batch_size: the run has 8, this actor has 16" in out, out[-2000:]
