"""The CPU kernel-generation run, measured: eval correctness before and after RL, per seed.

For each seed: ``agentrl run configs/kernelgen-cpu.yaml`` from scratch (template data, dataset step, model,
SFT, multi-turn RL). Prints the held-out eval correctness (greedy, multi-turn: the share of eval problems
for which some turn's kernel was correct) at v0 (after SFT) and at the last version, the gain in points, the
wall-clock of the whole run and of its RL phase, and the machine's load average while it ran (the machine is
shared: the same run on a loaded machine takes longer).

    python -m bench.kernelgen_cpu --seeds 0 1 2 [--out runs/bench-kernelgen]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from agentrl.launch.plots import read_metrics

REPO = Path(__file__).resolve().parents[1]


def run(out: Path, seed: int, extra: list[str]) -> tuple[float, float, str]:
    args = [a for o in [f"seed={seed}", f"dir={out}/{{name}}", *extra] for a in ("--set", o)]
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "agentrl.cli", "run", str(REPO / "configs/kernelgen-cpu.yaml"),
                           *args], capture_output=True, text=True, check=False)
    if proc.returncode:
        sys.exit(f"run failed ({out}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return start, time.time(), proc.stdout + proc.stderr


def rl_started(log: str) -> float:
    m = re.search(r"^(\S+ \S+),\d+ INFO \S+ started engine-0", log, re.M)
    if not m:
        raise SystemExit("no 'started engine-0' line in the run output")
    return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp()


def one_seed(out: Path, seed: int, extra: list[str]) -> dict[str, float]:
    load0 = os.getloadavg()[2]
    start, end, log = run(out / f"s{seed}", seed, extra)
    ev = [(int(r["controller/eval/version"]), float(r["controller/eval/accuracy"]))
          for r in read_metrics([out / f"s{seed}" / "kernelgen-cpu" / "controller_metrics.jsonl"])
          if "controller/eval/accuracy" in r]
    return {"seed": seed, "v0": ev[0][1], "v_end": ev[-1][1], "version": ev[-1][0], "total_s": end - start,
            "rl_s": end - rl_started(log), "load": (load0 + os.getloadavg()[2]) / 2}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=Path("runs/bench-kernelgen"))
    p.add_argument("--set", action="append", default=[], help="extra config overrides for every run")
    a = p.parse_args()
    rows = [one_seed(a.out, s, a.set) for s in a.seeds]
    print(f"{'seed':>4} {'correct@v0':>10} {'correct@end':>11} {'gain':>7} {'total':>7} {'RL':>6} {'load(15m)':>9}")
    for r in rows:
        print(f"{r['seed']:4.0f} {100 * r['v0']:9.1f}% {100 * r['v_end']:10.1f}% {100 * (r['v_end'] - r['v0']):+6.1f} "
              f"{r['total_s'] / 60:6.1f}m {r['rl_s'] / 60:5.1f}m {r['load']:9.2f}")
    gain = sum(r["v_end"] - r["v0"] for r in rows) / len(rows)
    print(f"mean gain: {100 * gain:+.1f} points over {len(rows)} seeds")


if __name__ == "__main__":
    main()
