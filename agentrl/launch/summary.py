"""What ``agentrl run`` prints when a run ends: eval accuracy from start to end, and where its outputs are."""

from __future__ import annotations

from pathlib import Path

from agentrl.bus.subjects import Subjects
from agentrl.config.run import RunConfig
from agentrl.launch.plots import read_metrics

__all__ = ["EvalPoint", "eval_history", "summary_lines"]

EvalPoint = tuple[int, float]  # (policy version, accuracy)


def eval_history(metrics_file: Path) -> list[EvalPoint]:
    """Every eval pass recorded in a controller metrics file, in order (empty if there is none)."""
    return [(int(row.get("controller/eval/version", -1)), float(row["controller/eval/accuracy"]))
            for row in read_metrics([metrics_file]) if "controller/eval/accuracy" in row]


def summary_lines(cfg: RunConfig, *, completed: bool = True) -> list[str]:
    """Eval accuracy at the first and last eval pass, the model, and the trajectories' stream.

    Only a completed run has a final model; a stopped one names the last weights its learner exported.
    """
    run_dir = Path(cfg.run_dir)
    lines = []
    evals = eval_history(run_dir / "controller_metrics.jsonl")
    if evals:
        (v0, a0), (v1, a1) = evals[0], evals[-1]
        lines.append(f"eval accuracy (held-out, greedy): {100 * a0:.1f}% at v{v0} -> {100 * a1:.1f}% at v{v1} "
                     f"({100 * (a1 - a0):+.1f} points)")
    final = Path(cfg.learner.path(cfg.learner.final_dir, str(run_dir)))
    last = final.parent / "last"
    if completed and (final / "config.json").exists():
        lines.append(f"final model (Hugging Face checkpoint): {final}")
    elif not completed and (last / "config.json").exists():
        lines.append(f"last weights (the run was stopped, this is not the final model): {last}")
    store = f" (store: {run_dir / 'nats'})" if not cfg.nats.url else ""
    lines.append(f"trajectories: stream {Subjects(cfg.name).traj_stream}{store}")
    return lines
