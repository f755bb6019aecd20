"""``agentrl run CONFIG.yaml``: start every actor of a local run under one supervisor.

A run directory that already holds a run is resumed (its stream, checkpoints and controller state; steps whose
output exists are skipped), and the command says so before it starts; ``--fresh`` first moves the old directory
aside (``<dir>.old-<time>``), so the run starts over.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from agentrl.commands import Command, add_print_config_argument, load_run_config, setup_logging
from agentrl.config.run import RunConfig
from agentrl.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config_file", nargs="?", metavar="CONFIG", help="run config (YAML), e.g. configs/quickstart.yaml")
    p.add_argument("--config", "-c", default=None, help="the run config, as every actor takes it (instead of CONFIG)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set training.max_steps=10 (repeatable)")
    p.add_argument("--nats", default=None, metavar="URL", help="use this NATS server instead of the embedded one")
    p.add_argument("--run", default=None, help="run name (overrides name)")
    p.add_argument("--launcher", choices=["local", "ray"], default=None,
                   help="where the actors run: local processes, or Ray actors on $RAY_ADDRESS / launch.ray.address "
                        "(launch.backend; default local)")
    p.add_argument("--fresh", action="store_true",
                   help="start over: move an existing run directory aside (to <dir>.old-<time>) instead of resuming it")
    add_print_config_argument(p)


def config_path(args: argparse.Namespace) -> str:
    """The config file, given as ``CONFIG`` or ``--config`` (one of them, or both naming the same file)."""
    given = {c for c in (args.config_file, args.config) if c}
    if not given:
        raise ConfigError("agentrl run needs a config file: agentrl run CONFIG (or --config CONFIG)")
    if len(given) > 1:
        raise ConfigError(f"two config files given ({args.config_file} and --config {args.config}); pass one")
    return given.pop()


def last_step(run_dir: Path) -> int | None:
    """The learner step of the run directory's latest checkpoint (None: none was written)."""
    latest = run_dir / "checkpoints" / "LATEST"
    try:
        return int(latest.read_text().strip().rsplit("_", 1)[-1])
    except (OSError, ValueError):
        return None


def rerun_notice(cfg: RunConfig) -> str | None:
    """What rerunning ``cfg`` in its existing run directory does (None: the directory holds no run yet)."""
    run_dir = cfg.run_dir
    if not (run_dir / "config.yaml").exists():
        return None
    step, total = last_step(run_dir), cfg.training.max_steps
    where = f"run {cfg.name}: {run_dir} already holds this run"
    if step is not None and total is not None and step >= total:
        return (f"{where}, finished at step {step}/{total}: nothing is left to train (this only repeats its summary); "
                "--fresh starts it over, --run NAME starts another")
    progress = f"from its checkpoint at step {step}" if step is not None else "(no learner checkpoint yet)"
    return f"{where}: resuming it {progress}; steps whose output exists are skipped; --fresh starts over"


def move_aside(run_dir: Path) -> Path:
    """``--fresh``: rename the run directory to ``<dir>.old-<time>`` (refused while a run uses it)."""
    from agentrl.launch.lock import run_lock

    target = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    with run_lock(run_dir):
        run_dir.rename(target)
    return target


def run(args: argparse.Namespace) -> int:
    from agentrl.launch.local import run_local
    from agentrl.launch.plan import check_colocate

    args.config = config_path(args)
    cfg = load_run_config(args, {"nats": "nats.url", "launcher": "launch.backend"})
    check_colocate(cfg)
    if args.fresh and cfg.run_dir.exists():
        print(f"run {cfg.name}: --fresh: the old run directory is now {move_aside(cfg.run_dir)}", file=sys.stderr)
    notice = rerun_notice(cfg)
    if notice:
        print(notice, file=sys.stderr, flush=True)
    setup_logging()
    if cfg.launch.backend == "ray":
        from agentrl.launch.ray_launch import run_ray

        completed, _ = asyncio.run(run_ray(cfg))
        return 0 if completed else 130
    completed, _ = asyncio.run(run_local(cfg))
    return 0 if completed else 130


COMMAND = Command(name="run", help="run every actor of a local training run (NATS, engines, workers, controller, learner)",
                  add_arguments=add_arguments, run=run)
