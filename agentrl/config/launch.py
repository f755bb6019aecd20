"""Config of a run started by ``agentrl run``: how many of each actor, which engines, steps run first, and where
the actors run (this machine, or a Ray cluster)."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from agentrl.config.loader import Section

__all__ = ["EngineKind", "LaunchBackend", "LaunchConfig", "PlacementStrategy", "RayConfig", "RayResources", "StepConfig"]


class StepConfig(Section):
    """A command run to completion before the actors start (model init, data generation, SFT warm-up).

    ``argv`` and ``skip_if_exists`` may use ``{run_dir}``, ``{config}`` (the resolved config file),
    ``{seed}`` (the run's seed) and ``{python}``; a leading ``agentrl`` runs this installation's CLI. The step is skipped when
    ``skip_if_exists`` names a path that exists (so a restarted run does not redo it).
    """

    name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]+$")]
    """the step's name (its log is logs/step-<name>.log)"""
    argv: list[str]
    """the command; may use {run_dir}, {config}, {seed} and {python}; a leading agentrl runs this
    installation's CLI"""
    skip_if_exists: str | None = None
    """skip the step when this path exists (a restarted run does not redo it)"""


EngineKind = Literal["embedded", "sglang", "command"]
LaunchBackend = Literal["local", "ray"]
PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]


class RayResources(Section):
    """What one actor of a kind reserves on a Ray cluster (its placement-group bundle)."""

    num_cpus: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    """CPUs reserved"""
    num_gpus: Annotated[float, msgspec.Meta(ge=0)] | None = None
    """GPUs reserved; None = auto: 1 for engines and the learner when the cluster has GPUs, else 0"""
    resources: dict[str, Annotated[float, msgspec.Meta(ge=0)]] = msgspec.field(default_factory=dict)
    """custom Ray resources (e.g. one a node was started with, to pin a kind to it)"""


def _gpu_kind() -> RayResources:
    return RayResources()


def _cpu_kind() -> RayResources:
    return RayResources(num_gpus=0.0)


class RayConfig(Section):
    """How ``agentrl run --launcher ray`` places actors on a Ray cluster.

    Every actor (and every step) runs as a process hosted by a Ray actor on some node; the run reserves one
    placement-group bundle per actor (``strategy`` PACK co-locates them, SPREAD spreads them over nodes; STRICT_
    variants insist). Steps run in the learner's bundle before it starts (the SFT warm-up needs its GPU). The
    embedded nats-server, when ``nats.url`` is unset, runs on the driver's node. Ray restarts a failed actor up to
    ``launch.max_restarts`` times, on another node when its node died; engines (and the learner with
    ``learner.weight_sync: distributed``) keep their address, so they restart only on their node. The run
    directory must be on a filesystem every node mounts at the same path.
    """

    address: str | None = None
    """the Ray cluster (host:port of its head, or auto); None = $RAY_ADDRESS, else a local Ray started for the run"""
    strategy: PlacementStrategy = "PACK"
    """placement-group strategy: PACK co-locates actors, SPREAD spreads them (STRICT_ variants insist)"""
    namespace: str | None = None
    """Ray namespace of the run's actors; None = agentrl-<run name>"""
    placement_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 300.0
    """the placement group (every actor's resources) must be reserved within this"""
    poll_s: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    """seconds between status and log polls of each actor"""
    engine: RayResources = msgspec.field(default_factory=_gpu_kind)
    """resources of each engine"""
    learner: RayResources = msgspec.field(default_factory=_gpu_kind)
    """resources of the learner (and of the steps, which run in its bundle before it)"""
    worker: RayResources = msgspec.field(default_factory=_cpu_kind)
    """resources of each agent worker"""
    envd: RayResources = msgspec.field(default_factory=_cpu_kind)
    """resources of each env worker"""
    controller: RayResources = msgspec.field(default_factory=_cpu_kind)
    """resources of the controller"""


class LaunchConfig(Section):
    """Which actors a local run starts, how it starts engines, and how it treats failures.

    Engines (``engine``): ``embedded`` runs ``agentrl engine``; ``sglang`` runs a real SGLang server,
    ``python -m sglang.launch_server --model-path <engine.model> --host <engine.host> --port <port>
    [--admin-api-key <run key>]``; ``command`` runs ``engine_command``, an argv that may use ``{python}``,
    ``{model}``, ``{host}``, ``{port}``, ``{run_dir}`` and ``{config}``. ``engine_args`` are appended in every
    case. Each engine is waited on until ``engine_health_path`` answers 200 (default ``/health`` for the
    embedded engine and commands, SGLang's ``/health_generate`` for SGLang), then probed with it every
    ``health_interval_s``; ``health_failures`` failures in a row restart it.
    """

    engines: Annotated[int, msgspec.Meta(ge=0)] = 1
    """engines started; 0 = use engine.client.urls (servers started elsewhere)"""
    engine: EngineKind = "embedded"
    """embedded: agentrl engine; sglang: a real SGLang server; command: engine_command"""
    engine_args: list[str] = msgspec.field(default_factory=list)
    """extra arguments appended to every engine's command line"""
    engine_command: list[str] = msgspec.field(default_factory=list)
    """with engine: command, the engine's argv (may use {python}, {model}, {host}, {port}, {run_dir}, {config})"""
    engine_health_path: str | None = None
    """readiness and health probe path; None = /health (embedded, command) or /health_generate (sglang)"""
    workers: Annotated[int, msgspec.Meta(ge=1)] = 1
    """agent worker processes"""
    envd: Annotated[int, msgspec.Meta(ge=0)] = 1
    """env worker processes, started only when envd.envs names environments"""
    max_restarts: Annotated[int, msgspec.Meta(ge=0)] = 3
    """restarts per actor, then the run stops with a report"""
    grace_s: Annotated[float, msgspec.Meta(gt=0)] = 15.0
    """seconds from SIGTERM to SIGKILL when the run stops"""
    engine_ready_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 300.0
    """an engine not healthy this long after its start fails the run"""
    health_interval_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    """seconds between health probes of engines and nats-server"""
    health_failures: Annotated[int, msgspec.Meta(ge=1)] = 3
    """failed probes in a row before a restart"""
    hang_timeout_s: Annotated[float, msgspec.Meta(ge=0)] = 120.0
    """bus actors without a heartbeat this long are restarted; 0 = never"""
    steps: list[StepConfig] = msgspec.field(default_factory=list)
    """commands run to completion before the actors start (model init, data generation, SFT warm-up)"""
    backend: LaunchBackend = "local"
    """local: every actor a child process of agentrl run; ray: Ray actors on a cluster (agentrl run --launcher)"""
    ray: RayConfig = msgspec.field(default_factory=RayConfig)
    """with backend ray: the cluster, placement and resources per actor kind"""

    def __post_init__(self) -> None:
        if self.engine == "command" and self.engines and not self.engine_command:
            raise ValueError("launch.engine=command needs launch.engine_command (the engine's argv)")
        if self.engine_health_path is not None and not self.engine_health_path.startswith("/"):
            raise ValueError(f"launch.engine_health_path={self.engine_health_path!r} must start with '/'")
