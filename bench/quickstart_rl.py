"""The quickstart's RL phase alone, in several settings, from one SFT checkpoint, against the synchronous run.

Runs ``agentrl run configs/quickstart.yaml`` once per variant in a run directory that already holds the
checkpoint's ``data``, ``base`` and ``sft`` (so the preparation steps are skipped), and prints for each:
the RL wall-clock (engine start to the end of the run), the training loop (first to last learner step),
the learner's mean wait for a batch, APRIL aborts, eval accuracy at the start and the end, and the loop
time of the synchronous variant divided by this one's.

    python bench/quickstart.py --seeds 0 --out runs/bench-quickstart   # makes runs/bench-quickstart/async-s0
    python -m bench.quickstart_rl runs/bench-quickstart/async-s0/quickstart [--set worker.poll_timeout_s=1.0]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from agentrl.launch.plots import read_metrics
from bench.quickstart import SYNC, evals, rl_started, run

VARIANTS = {
    "async (config: eta=1)": [],
    "async, over-provisioning alpha=0.5": ["controller.april_alpha=0.5"],
    "sync (eta=0)": SYNC,
}


def one(prepared_from: Path, out: Path, seed: int, overrides: list[str]) -> dict[str, float]:
    run_dir = out / "quickstart"
    shutil.rmtree(out, ignore_errors=True)
    run_dir.mkdir(parents=True)
    for part in ("data", "base", "sft"):
        shutil.copytree(prepared_from / part, run_dir / part)
    _, log = run(out, seed, overrides)
    end = time.time()
    learner = read_metrics([run_dir / "learner_metrics.jsonl"])
    counters = [r for r in read_metrics([run_dir / "controller_metrics.jsonl"]) if "controller/resumed" in r]
    ev = evals(run_dir)
    return {
        "rl_s": end - rl_started(log), "loop_s": learner[-1]["time"] - learner[0]["time"],
        "wait_s": sum(r["learner/time/wait"] for r in learner) / len(learner),
        "resumed": counters[-1]["controller/resumed"], "acc0": ev[0][2], "acc1": ev[-1][2], "v1": ev[-1][1],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prepared", type=Path, help="a quickstart run directory holding data/, base/ and sft/")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-quickstart-rl"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="k=v for every variant")
    a = ap.parse_args()
    results = {}
    for i, (name, extra) in enumerate(VARIANTS.items()):
        results[name] = one(a.prepared.resolve(), a.out.resolve() / f"v{i}", a.seed, [*a.overrides, *extra])
    sync_loop = results["sync (eta=0)"]["loop_s"]
    print(f"overrides for every variant: {a.overrides or 'none'}")
    print(f"{'variant':40s}  RL(s)  loop(s)  wait/step(s)  resumed  eval start -> end  sync loop / loop")
    for name, r in results.items():
        print(f"{name:40s}  {r['rl_s']:5.1f}  {r['loop_s']:7.1f}  {r['wait_s']:12.2f}  {r['resumed']:7.0f}  "
              f"{r['acc0']:5.1%} -> {r['acc1']:5.1%} (v{r['v1']:.0f})  {sync_loop / r['loop_s']:16.2f}", flush=True)


if __name__ == "__main__":
    main()
