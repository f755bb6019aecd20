"""The learner's log gets one line per step (and no progress bars from saving weights)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import transformers

from trainer.metrics import MetricsSink, step_line

RECORD = {"learner/version": 3, "learner/reward/mean": 0.25, "learner/loss/total": 0.125, "learner/grad_norm": 0.5,
          "learner/batch/trajectories": 32, "learner/staleness/hist": {"0": 10}, "learner/time/train": 1.25,
          "learner/time/wait": 0.5}


def test_step_line_names_the_numbers_a_person_watches() -> None:
    assert step_line(3, RECORD) == ("step 3, v 3, reward 0.250, loss 0.1250, grad_norm 0.500, trajectories 32, 1.8s")


async def test_each_record_is_a_line_in_the_learner_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="trainer.metrics")
    sink = MetricsSink(tmp_path / "m.jsonl")
    await sink.record(3, RECORD)
    await sink.record(4, {**RECORD, "learner/version": 4})
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["step 3", "step 4"]


async def test_the_learner_turns_off_transformers_progress_bars(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from agentrl.config.run import RunConfig
    from trainer import main

    transformers.utils.logging.enable_progress_bar()

    async def stop_here(*args: object) -> None:
        raise RuntimeError("stop")

    monkeypatch.setattr(main, "_serve", stop_here)
    with pytest.raises(RuntimeError, match="stop"):
        await main.serve_learner(RunConfig(dir=str(tmp_path / "run")), None)
    assert not transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.enable_progress_bar()


def test_step_counters_count_the_graphs_torch_compile_builds() -> None:
    """A learner step's metrics say when it recompiled (or, on a GPU, reallocated): what makes one step slow."""
    import torch

    from trainer.metrics import StepCounters

    before = StepCounters.now()
    fn = torch.compile(lambda x: x.sin() * 3, dynamic=False)
    fn(torch.ones(3))
    fn(torch.ones(5))  # a new static shape: a second graph
    grew = StepCounters.now().since(before)
    assert grew.compiled_graphs == 2 and grew.alloc_retries == 0
    assert grew.as_metrics()["learner/perf/compiled_graphs"] == 2.0
