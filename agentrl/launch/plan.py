"""What ``agentrl run`` starts, as data: a list of :class:`ActorSpec` built from the run config (pure).

Order: the config's ``launch.steps`` (run to completion), the embedded nats-server (waited on until it
serves JetStream, and probed from then on), engines (each waited on until its health path answers), env
workers, agent workers, the controller, and the learner, whose normal exit ends the run. Every actor gets
the same resolved config file, the bus URL and the run name, so the file alone says what ran; what differs
per actor travels in its environment: its own NATS credentials file and, for engines and the actors that
call their admin endpoints, the run's engine admin key.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agentrl.bus.auth import CREDENTIALS_ENV, Role
from agentrl.client.protocol import ADMIN_KEY_ENV
from agentrl.config.run import RunConfig
from agentrl.errors import ConfigError
from agentrl.launch.supervisor import ActorSpec, ReadyCheck

__all__ = ["LaunchContext", "actor_names", "agentrl_argv", "bus_users", "check_colocate", "engine_argv",
           "engine_health_path", "engine_urls", "plan_actors"]


def agentrl_argv(*args: str) -> list[str]:
    """argv that runs this installation's ``agentrl`` CLI (independent of PATH)."""
    return [sys.executable, "-m", "agentrl.cli", *args]


@dataclass(frozen=True)
class LaunchContext:
    """What the launcher prepared for one run, besides its config."""

    config_path: Path  # the resolved config every actor reads
    nats_url: str
    engine_ports: list[int]
    http_check: Callable[[str], ReadyCheck]  # URL (with path) -> a probe that it answers 200
    nats_argv: list[str] | None = None  # the embedded nats-server's command (None: an external server)
    nats_check: ReadyCheck | None = None
    credentials: Mapping[str, Path] = field(default_factory=dict)  # actor name -> its NATS credentials file
    engine_admin_key: str | None = None
    engine_hosts: list[str] = field(default_factory=list)  # each engine's bind address (empty: engine.host for all)


def engine_urls(cfg: RunConfig, ports: list[int], hosts: list[str] | None = None) -> list[str]:
    """URLs of the engines a run uses: the ones it starts (on ``hosts``, default ``engine.host``), or
    ``engine.client.urls`` when it starts none."""
    if cfg.launch.engines == 0:
        return list(cfg.engine.client.urls)
    hosts = hosts or [cfg.engine.host] * len(ports)
    return [f"http://{h}:{p}" for h, p in zip(hosts, ports, strict=True)]


def engine_health_path(cfg: RunConfig) -> str:
    """The path an engine is probed on: configured, else SGLang's ``/health_generate`` or ``/health`` (also for
    SGLang when colocated: a released engine generates nothing until the learner's step ends)."""
    lc = cfg.launch
    generates = lc.engine == "sglang" and not cfg.learner.colocate
    return lc.engine_health_path or ("/health_generate" if generates else "/health")


def check_colocate(cfg: RunConfig) -> None:
    """``learner.colocate`` shares one device between the learner and the engines this run starts: a
    :class:`~agentrl.errors.ConfigError` saying why when the config cannot do that."""
    problem = _colocate_problem(cfg) if cfg.learner.colocate else None
    if problem:
        raise ConfigError(f"learner.colocate: {problem}")


def _colocate_problem(cfg: RunConfig) -> str | None:
    lc, learner = cfg.launch, cfg.learner
    if lc.backend != "local":
        return "the ray launcher gives the engines and the learner devices of their own; use launch.backend: local"
    if lc.engines == 0:
        return ("needs engines this run starts (launch.engines >= 1): engines at engine.client.urls need not share "
                "the learner's device")
    if lc.engine == "command":
        return "launch.engine: command cannot be asked to release its memory; use embedded, or sglang"
    if lc.engine == "sglang" and "--enable-memory-saver" not in lc.engine_args:
        return "SGLang releases its memory only with --enable-memory-saver: add it to launch.engine_args"
    if learner.backend != "torch":
        return f"the {learner.backend} backend cannot move its states off the device; use learner.backend: torch"
    engines = _engine_device(cfg)
    if _resolve_device(engines) != _resolve_device(learner.device):
        return (f"the engines run on {engines} and the learner on learner.device={learner.device}: colocated mode "
                "shares one device")
    if learner.weight_sync == "distributed" and _resolve_group_backend(cfg) == "nccl":
        return ("learner.weight_sync: distributed over NCCL cannot hold the learner and an engine of one GPU in one "
                "group; set learner.weight_group.backend: gloo, or weight_sync: disk")
    return None


def _flag(args: list[str], name: str) -> str | None:
    """The value of ``name`` in an argv (``--name value`` or ``--name=value``), the last one given."""
    found = None
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            found = args[i + 1]
        elif arg.startswith(name + "="):
            found = arg.split("=", 1)[1]
    return found


def _engine_device(cfg: RunConfig) -> str:
    lc = cfg.launch
    if lc.engine == "sglang":
        return f"cuda:{_flag(lc.engine_args, '--base-gpu-id') or 0}"
    return _flag(lc.engine_args, "--device") or cfg.engine.device


def _resolve_device(name: str) -> str:
    """``auto`` as the engine and the learner resolve it on this machine; ``cuda`` is ``cuda:0``."""
    if name == "auto":
        import torch

        name = "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda:0" if name == "cuda" else name


def _resolve_group_backend(cfg: RunConfig) -> str:
    backend = cfg.learner.weight_group.backend
    if backend != "auto":
        return backend
    return "nccl" if _resolve_device(cfg.learner.device).startswith("cuda") else "gloo"


def _fill(text: str, cfg: RunConfig, config_path: Path, **more: object) -> str:
    return text.format(run_dir=str(cfg.run_dir), config=str(config_path), python=sys.executable, seed=cfg.seed,
                       **more)


def engine_argv(cfg: RunConfig, config_path: Path, port: int, admin_key: str | None, host: str | None = None) -> list[str]:
    """The command of one engine on ``port``, bound to ``host`` (default ``engine.host``; see
    :class:`~agentrl.config.launch.LaunchConfig`)."""
    lc, ec = cfg.launch, cfg.engine
    if lc.engine == "embedded":
        bind = ["--host", host] if host else []
        return agentrl_argv("engine", "--config", str(config_path), *bind, "--port", str(port), *lc.engine_args)
    host = host or ec.host
    if lc.engine == "sglang":
        key = ["--admin-api-key", admin_key] if admin_key else []
        return [sys.executable, "-m", "sglang.launch_server", "--model-path", str(ec.model), "--host", host,
                "--port", str(port), *key, *lc.engine_args]
    fill = {"model": str(ec.model), "host": host, "port": port}
    return [_fill(a, cfg, config_path, **fill) for a in lc.engine_command] + list(lc.engine_args)


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


def _env(ctx: LaunchContext, name: str, *, admin_key: bool = False) -> dict[str, str]:
    env = {CREDENTIALS_ENV: str(ctx.credentials[name])} if name in ctx.credentials else {}
    if admin_key and ctx.engine_admin_key:
        env[ADMIN_KEY_ENV] = ctx.engine_admin_key
    return env


def _nats(cfg: RunConfig, ctx: LaunchContext) -> list[ActorSpec]:
    if ctx.nats_argv is None:
        return []
    lc = cfg.launch
    return [ActorSpec("nats", ctx.nats_argv, max_restarts=lc.max_restarts, ready=ctx.nats_check, ready_timeout_s=60,
                      health=ctx.nats_check, health_interval_s=lc.health_interval_s,
                      health_failures=lc.health_failures, death_signal=signal.SIGTERM, stop_last=True)]


def _engines(cfg: RunConfig, ctx: LaunchContext) -> list[ActorSpec]:
    lc, specs = cfg.launch, []
    hosts: list[str | None] = [*ctx.engine_hosts] or [None] * len(ctx.engine_ports)
    urls = engine_urls(cfg, ctx.engine_ports, ctx.engine_hosts or None)
    for i, (port, url, host) in enumerate(zip(ctx.engine_ports, urls, hosts, strict=False)):
        name = f"engine-{i}"
        check = ctx.http_check(url + engine_health_path(cfg))
        specs.append(ActorSpec(
            name, engine_argv(cfg, ctx.config_path, port, ctx.engine_admin_key, host), max_restarts=lc.max_restarts,
            ready=check, ready_timeout_s=lc.engine_ready_timeout_s, health=check,
            health_interval_s=lc.health_interval_s, health_failures=lc.health_failures,
            env=_env(ctx, name, admin_key=True),
        ))
    return specs


def bus_users(cfg: RunConfig) -> dict[str, Role]:
    """Every NATS user of a local run and its role: the actors :func:`plan_actors` starts, the launcher (admin:
    it creates the run's streams and buckets) and an inspector (read-only, for ``agentrl tail`` and the viewer)."""
    lc = cfg.launch
    users: dict[str, Role] = {"launcher": "admin", "inspector": "inspector"}
    users |= {f"engine-{i}": "engine" for i in range(lc.engines)}
    if cfg.envd.envs:
        users |= {f"envd-{i}": "envd" for i in range(lc.envd)}
    users |= {f"worker-{i}": "worker" for i in range(lc.workers)}
    return users | {"controller": "controller", "learner": "learner"}


def actor_names(cfg: RunConfig) -> list[str]:
    """The long-running actors of a run (not its steps nor its embedded bus), in start order."""
    return [name for name in bus_users(cfg) if name not in ("launcher", "inspector")]


def plan_actors(cfg: RunConfig, ctx: LaunchContext) -> list[ActorSpec]:
    """Every process of a local run, in start order."""
    common = ["--config", str(ctx.config_path), "--nats", ctx.nats_url, "--run", cfg.name]
    lc = cfg.launch
    hang = lc.hang_timeout_s or None

    def bus_actor(name: str, *args: str, admin_key: bool = False, finishes: bool = False) -> ActorSpec:
        return ActorSpec(name, agentrl_argv(*args, *common), max_restarts=lc.max_restarts, finishes_run=finishes,
                         hang_timeout_s=hang, env=_env(ctx, name, admin_key=admin_key))

    specs = [*_steps(cfg, ctx.config_path), *_nats(cfg, ctx), *_engines(cfg, ctx)]
    if cfg.envd.envs:
        specs += [bus_actor(f"envd-{i}", "envd") for i in range(lc.envd)]
    specs += [bus_actor(f"worker-{i}", "worker", admin_key=True) for i in range(lc.workers)]
    specs.append(bus_actor("controller", "controller", admin_key=True, finishes=True))
    specs[-1].argv.append("--exit-when-done")
    # a learner that broadcasts weights forms the engines' weight group (/init_weights_update_group: admin); a
    # colocated one pauses them and releases their memory (admin too)
    engine_admin = cfg.learner.weight_sync == "distributed" or cfg.learner.colocate
    specs.append(bus_actor("learner", "learner", admin_key=engine_admin, finishes=True))
    return specs
