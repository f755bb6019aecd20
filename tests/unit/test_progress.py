"""Progress line and plots from metrics."""

from __future__ import annotations

import json
from pathlib import Path

from agentrl.launch.plots import plot_run, read_metrics
from agentrl.launch.progress import Progress


def test_progress_line_shows_step_reward_eval_staleness_and_eta() -> None:
    p = Progress(total_steps=10, now=0.0)
    assert p.line(now=5.0) == "[0m05s] | step 0/10 | v0"
    assert p.line(now=5.0, preparing="step-sft") == "[0m05s] preparing: step-sft (log: logs/step-sft.log)"
    p.update({"learner/step": 1, "learner/version": 1, "learner/reward/mean": 0.25}, now=10.0)
    p.update({"learner/step": 3, "learner/version": 3, "learner/staleness/hist": {"0": 5, "2": 1, "3": 0},
              "learner/perf/tokens_per_s": 1234.4, "controller/eval/accuracy": 0.5}, now=30.0)
    line = p.line(now=30.0)
    assert line == "[0m30s] | step 3/10 | v3 | reward 0.250 | eval 50.0% | stale≤2 | 1234 tok/s | ETA 1m10s"


def test_plots_written_for_series_with_data(tmp_path: Path) -> None:
    f = tmp_path / "learner_metrics.jsonl"
    rows = [{"time": 100.0 + i, "learner/step": i, "learner/reward/mean": i / 10} for i in range(5)]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n{torn")
    assert len(read_metrics([f, tmp_path / "missing.jsonl"])) == 5
    written = plot_run(tmp_path, [f])
    assert [p.name for p in written] == ["reward.png"]
    assert written[0].stat().st_size > 1000
