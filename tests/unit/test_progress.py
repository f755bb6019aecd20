"""Progress line and plots from metrics."""

from __future__ import annotations

import json
from pathlib import Path

from agentrl.config import RunConfig, load_config
from agentrl.launch.plots import plot_run, read_metrics
from agentrl.launch.progress import Progress
from agentrl.launch.summary import eval_history, summary_lines


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


def test_summary_names_the_accuracy_gain_the_final_model_and_the_stream(tmp_path: Path) -> None:
    cfg = load_config(RunConfig, None, [f"dir={tmp_path}/{{name}}", "name=demo"])
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True)
    assert summary_lines(cfg) == [f"trajectories: stream AGENTRL_demo_TRAJ (store: {run_dir / 'nats'})"]
    rows = [{"controller/eval/version": 0, "controller/eval/accuracy": 0.05}, {"controller/admitted": 3},
            {"controller/eval/version": 20, "controller/eval/accuracy": 0.75}]
    (run_dir / "controller_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "{torn")
    assert eval_history(run_dir / "controller_metrics.jsonl") == [(0, 0.05), (20, 0.75)]
    (run_dir / "final").mkdir()
    (run_dir / "final" / "config.json").write_text("{}")
    assert summary_lines(cfg)[:2] == ["eval accuracy (held-out, greedy): 5.0% at v0 -> 75.0% at v20 (+70.0 points)",
                                      f"final model (Hugging Face checkpoint): {run_dir / 'final'}"]
