"""The run's metrics JSONL files as series for the viewer's plots (reward, eval accuracy, staleness, throughput)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agentrl.launch.plots import PLOTS, read_metrics

__all__ = ["metrics_series"]


def metrics_series(run_dir: Path | None, max_points: int = 2_000) -> list[dict[str, Any]]:
    """One entry per plot of :data:`~agentrl.launch.plots.PLOTS` that has data: title, y label and its series.

    Each series is ``[[seconds since the first record, value], ...]``, thinned to at most ``max_points``.
    """
    if run_dir is None:
        return []
    rows = read_metrics(sorted(run_dir.glob("*metrics*.jsonl")))
    times = [r["time"] for r in rows if isinstance(r.get("time"), int | float)]
    t0 = min(times) if times else 0.0
    plots = []
    for title, ylabel, keys in PLOTS.values():
        series = {}
        for key in keys:
            points = [[round(float(r.get("time", t0)) - t0, 3), float(r[key])]
                      for r in rows if isinstance(r.get(key), int | float)]
            if points:
                step = max(1, len(points) // max_points)
                series[key] = points[::step]
        if series:
            plots.append({"title": title, "ylabel": ylabel, "series": series})
    return plots
