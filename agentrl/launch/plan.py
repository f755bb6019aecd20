"""What ``agentrl run`` starts, as data: a list of :class:`ActorSpec` built from the run config (pure).

Order: the config's ``launch.steps`` (run to completion), engines (each waited on
until ``/health`` answers), env workers, agent workers, the controller, and the
learner, whose normal exit ends the run. Every actor gets the same resolved
config file, the bus URL and the run name, so the file alone says what ran.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from agentrl.config.run import RunConfig
from agentrl.launch.supervisor import ActorSpec, ReadyCheck

__all__ = ["agentrl_argv", "engine_urls", "plan_actors"]


def agentrl_argv(*args: str) -> list[str]:
    """argv that runs this installation's ``agentrl`` CLI (independent of PATH)."""
    return [sys.executable, "-m", "agentrl.cli", *args]


def engine_urls(cfg: RunConfig, ports: list[int]) -> list[str]:
    """URLs of the engines a run uses: the ones it starts, or ``engine.client.urls`` when it starts none."""
    if cfg.launch.engines == 0:
        return list(cfg.engine.client.urls)
    return [f"http://{cfg.engine.host}:{p}" for p in ports]


def _fill(text: str, cfg: RunConfig, config_path: Path) -> str:
    return text.format(run_dir=str(cfg.run_dir), config=str(config_path), python=sys.executable, seed=cfg.seed)


def _steps(cfg: RunConfig, config_path: Path) -> list[ActorSpec]:
    specs = []
    for step in cfg.launch.steps:
        if step.skip_if_exists and Path(_fill(step.skip_if_exists, cfg, config_path)).exists():
            continue
        argv = [_fill(a, cfg, config_path) for a in step.argv]
        if argv and argv[0] == "agentrl":
            argv = agentrl_argv(*argv[1:])
        specs.append(ActorSpec(f"step-{step.name}", argv, step=True, max_restarts=0))
    return specs


def plan_actors(
    cfg: RunConfig, config_path: Path, nats_url: str, engine_ports: list[int],
    health_check: Callable[[str], ReadyCheck],
) -> list[ActorSpec]:
    """Every process of a local run, in start order; ``health_check(url)`` makes an engine's readiness probe."""
    common = ["--config", str(config_path), "--nats", nats_url, "--run", cfg.name]
    restarts = cfg.launch.max_restarts
    specs = _steps(cfg, config_path)
    for i, (port, url) in enumerate(zip(engine_ports, engine_urls(cfg, engine_ports), strict=False)):
        specs.append(ActorSpec(
            f"engine-{i}", agentrl_argv("engine", "--config", str(config_path), "--port", str(port)),
            max_restarts=restarts, ready=health_check(url), ready_timeout_s=cfg.launch.engine_ready_timeout_s,
        ))
    if cfg.envd.envs:
        specs += [ActorSpec(f"envd-{i}", agentrl_argv("envd", *common), max_restarts=restarts)
                  for i in range(cfg.launch.envd)]
    specs += [ActorSpec(f"worker-{i}", agentrl_argv("worker", *common), max_restarts=restarts)
              for i in range(cfg.launch.workers)]
    specs.append(ActorSpec("controller", agentrl_argv("controller", *common, "--exit-when-done"),
                           max_restarts=restarts, finishes_run=True))
    specs.append(ActorSpec("learner", agentrl_argv("learner", *common), max_restarts=restarts, finishes_run=True))
    return specs
