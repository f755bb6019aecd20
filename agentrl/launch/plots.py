"""PNG plots of a finished (or running) run from its metrics JSONL files."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["PLOTS", "plot_run", "read_metrics"]

# file name -> (title, y label, metric keys plotted against the learner step or wall time)
PLOTS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "reward.png": ("Training reward", "reward (batch mean)", ("learner/reward/mean",)),
    "eval_accuracy.png": ("Eval accuracy (held out, greedy)", "accuracy", ("controller/eval/accuracy",)),
    "staleness.png": ("Staleness of trained tokens", "versions behind", ("learner/staleness/mean", "learner/staleness/max")),
    "throughput.png": ("Learner throughput", "tokens / s", ("learner/perf/tokens_per_s",)),
}


def read_metrics(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """All records of the given JSONL files (missing files and torn last lines are skipped)."""
    rows: list[dict[str, Any]] = []
    for path in paths:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs: list[float] = []
    ys: list[float] = []
    for r in rows:
        if key in r and isinstance(r[key], int | float):
            xs.append(float(r.get("time", r.get("learner/step", len(xs))) or 0.0))
            ys.append(float(r[key]))
    if xs:
        t0 = min(xs)
        xs = [x - t0 for x in xs]
    return xs, ys


def plot_run(run_dir: Path, metrics_files: Iterable[Path]) -> list[Path]:
    """Write the PNGs of :data:`PLOTS` that have data into ``run_dir/plots``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_files)
    out_dir = run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (title, ylabel, keys) in PLOTS.items():
        series = {k: _series(rows, k) for k in keys}
        if not any(xs for xs, _ in series.values()):
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key, (xs, ys) in series.items():
            if xs:
                ax.plot(xs, ys, marker=".", label=key)
        ax.set(title=title, xlabel="seconds since start", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        written.append(out_dir / name)
    return written
