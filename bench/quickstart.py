"""The quickstart, measured: async RL (eta=1) against the same run synchronously (eta=0).

For each seed: run ``agentrl run configs/quickstart.yaml`` from scratch (data, model, SFT, RL), then run
the synchronous baseline from the same SFT checkpoint (the preparation steps are skipped because their
outputs are copied in). Prints the eval accuracy (held-out problems, greedy) at the SFT start and at the
end, the RL wall-clock of both, the time each first reached 90% of the sync run's final accuracy, and
the ratios.

    python -m bench.quickstart --seeds 0 1 2 [--out runs/bench-quickstart]

``--set KEY=VALUE`` applies to both runs (e.g. ``training.max_steps=20``); ``--second KEY=VALUE ...`` replaces
the synchronous settings of the second run (e.g. ``--second learner.backend=megatron``: the same async run on
another learner backend, from the same SFT checkpoint).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from agentrl.launch.plots import read_metrics

REPO = Path(__file__).resolve().parents[1]
SYNC = ["training.max_staleness=0", "controller.april_alpha=null"]


def run(out: Path, seed: int, extra: list[str]) -> tuple[float, str]:
    args = [a for o in [f"seed={seed}", f"dir={out}/{{name}}", *extra] for a in ("--set", o)]
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "agentrl.cli", "run", str(REPO / "configs/quickstart.yaml"), *args],
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        sys.exit(f"run failed ({out}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return start, proc.stdout + proc.stderr


def rl_started(log: str) -> float:
    """Wall time when the first engine started (the preparation steps are over)."""
    m = re.search(r"^(\S+ \S+),\d+ INFO \S+ started engine-0", log, re.M)
    if not m:
        raise SystemExit("no 'started engine-0' line in the run output")
    return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp()


def evals(run_dir: Path) -> list[tuple[float, int, float]]:
    """(wall time, policy version, accuracy) of every eval pass."""
    return [(r["time"], int(r["controller/eval/version"]), r["controller/eval/accuracy"])
            for r in read_metrics([run_dir / "controller_metrics.jsonl"]) if "controller/eval/accuracy" in r]


def time_to(ev: list[tuple[float, int, float]], start: float, target: float) -> float | None:
    return next((t - start for t, _, acc in ev if acc >= target), None)


def one_seed(out: Path, seed: int, common: list[str], second: list[str]) -> dict[str, float | None]:
    async_dir, sync_dir = out / f"async-s{seed}", out / f"sync-s{seed}"
    start, log = run(async_dir, seed, common)
    end_async = time.time()
    rl_async = rl_started(log)
    prepared = sync_dir / "quickstart"
    shutil.rmtree(sync_dir, ignore_errors=True)
    prepared.mkdir(parents=True)
    for part in ("data", "base", "sft"):
        shutil.copytree(async_dir / "quickstart" / part, prepared / part)
    _, log_sync = run(sync_dir, seed, [*common, *second])
    end_sync = time.time()
    rl_sync = rl_started(log_sync)
    ev_a, ev_s = evals(async_dir / "quickstart"), evals(prepared)
    target = 0.9 * ev_s[-1][2]
    return {
        "seed": seed, "total_s": end_async - start, "sft_acc": ev_a[0][2], "async_acc": ev_a[-1][2],
        "sync_acc": ev_s[-1][2], "async_rl_s": end_async - rl_async, "sync_rl_s": end_sync - rl_sync,
        "async_to_target_s": time_to(ev_a, rl_async, target), "sync_to_target_s": time_to(ev_s, rl_sync, target),
    }


def fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("runs/bench-quickstart"))
    ap.add_argument("--set", dest="common", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--second", nargs="+", default=SYNC, metavar="KEY=VALUE",
                    help="overrides of the second run (default: synchronous, eta=0)")
    a = ap.parse_args()
    if a.second != SYNC:
        print(f"second run: {' '.join(a.second)} (the 'sync' columns below)")
    print("seed  total(s)  SFT acc  async acc  sync acc  async RL(s)  sync RL(s)  sync/async  "
          "to 90% of sync final: async(s)  sync(s)  ratio", flush=True)
    for seed in a.seeds:
        r = one_seed(a.out.resolve(), seed, a.common, a.second)
        ratio = r["sync_rl_s"] / r["async_rl_s"]  # type: ignore[operator]
        a_t, s_t = r["async_to_target_s"], r["sync_to_target_s"]
        t_ratio = s_t / a_t if a_t and s_t else None
        print(f"{seed:4d}  {r['total_s']:8.0f}  {r['sft_acc']:7.1%}  {r['async_acc']:9.1%}  {r['sync_acc']:8.1%}  "
              f"{r['async_rl_s']:11.0f}  {r['sync_rl_s']:10.0f}  {ratio:10.2f}  "
              f"{fmt(a_t, '30.0f')}  {fmt(s_t, '7.0f')}  {fmt(t_ratio, '5.2f')}", flush=True)


if __name__ == "__main__":
    main()
