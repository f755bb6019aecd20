"""The config of a whole run: one section per actor, composed in :class:`RunConfig`.

Each actor reads the same file and uses its own section, so one YAML in
``configs/`` describes a run end to end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import msgspec

from agentrl.config.controller import ControllerConfig
from agentrl.config.engine import EngineConfig
from agentrl.config.launch import LaunchConfig
from agentrl.config.learner import LearnerConfig
from agentrl.config.loader import Section
from agentrl.config.worker import EnvdConfig, WorkerConfig
from agentrl.errors import ConfigError

__all__ = ["NatsConfig", "RunConfig", "check_agreement"]


class NatsConfig(Section):
    """Where the bus is, and how the embedded server is set up when none is given."""

    url: str | None = None  # nats://host:4222; None starts the embedded nats-server
    connect_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    connect_attempts: Annotated[int, msgspec.Meta(ge=1)] = 10
    max_payload_mb: Annotated[int, msgspec.Meta(ge=1, le=64)] = 8
    stream_max_age_s: Annotated[float, msgspec.Meta(ge=0)] = 7 * 24 * 3600.0  # 0 = forever
    replicas: Annotated[int, msgspec.Meta(ge=1, le=5)] = 1
    max_deliver: Annotated[int, msgspec.Meta(ge=1)] = 20  # deliveries before a message is dead-lettered
    ack_wait_s: Annotated[float, msgspec.Meta(gt=0)] = 300.0
    credentials: str | None = None  # this actor's credentials file (agentrl/bus/auth.py); else $AGENTRL_NATS_CREDENTIALS
    auth: bool = True  # `agentrl run` with its embedded server: per-actor users and permissions made at launch
    tls: bool = False  # `agentrl run` with its embedded server: TLS on the client port, certificates made at launch


class RunConfig(Section):
    """Everything about one run."""

    name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]+$")] = "default"
    dir: str = "runs/{name}"  # run directory; {name} is replaced by the run name
    seed: int = 0
    nats: NatsConfig = msgspec.field(default_factory=NatsConfig)
    engine: EngineConfig = msgspec.field(default_factory=EngineConfig)
    controller: ControllerConfig = msgspec.field(default_factory=ControllerConfig)
    learner: LearnerConfig = msgspec.field(default_factory=LearnerConfig)
    worker: WorkerConfig = msgspec.field(default_factory=WorkerConfig)
    envd: EnvdConfig = msgspec.field(default_factory=EnvdConfig)
    launch: LaunchConfig = msgspec.field(default_factory=LaunchConfig)

    def __post_init__(self) -> None:
        _fill_run_dir(self, str(self.run_dir))

    @property
    def run_dir(self) -> Path:
        return Path(self.dir.format(name=self.name))


def check_agreement(cfg: RunConfig) -> None:
    """Settings that two actors read must agree: B (trajectories per step), eta when both set, and the
    last step when the controller evaluates the final policy.

    Checked where one config drives both actors (``agentrl run``); raises ``ConfigError``.
    """
    b_ctrl, b_learn = cfg.controller.batch_size, cfg.learner.batch.trajectories_per_step
    if b_ctrl != b_learn:
        raise ConfigError(
            f"config: controller.batch_size={b_ctrl} and learner.batch.trajectories_per_step={b_learn} must be equal "
            "(both are B, the trajectories of one train step)"
        )
    eta_ctrl, eta_learn = cfg.controller.max_staleness, cfg.learner.batch.max_staleness
    if eta_learn is not None and eta_learn != eta_ctrl:
        raise ConfigError(
            f"config: controller.max_staleness={eta_ctrl} and learner.batch.max_staleness={eta_learn} must be equal "
            "(admission and training use the same staleness bound)"
        )
    ctrl, steps = cfg.controller, cfg.learner.max_steps
    if ctrl.eval.dataset is not None and ctrl.eval.at_end and ctrl.max_steps is not None and 0 < steps < ctrl.max_steps:
        raise ConfigError(
            f"config: controller.eval.at_end waits for policy version controller.max_steps={ctrl.max_steps}, but the "
            f"learner stops at learner.max_steps={steps}; make them equal or set controller.eval.at_end=false"
        )


def _fill_run_dir(obj: Any, run_dir: str) -> Any:
    """Replace ``{run_dir}`` in every string of a config tree (in place for structs), so any field may use it."""
    if isinstance(obj, str):
        return obj.replace("{run_dir}", run_dir)
    if isinstance(obj, list):
        return [_fill_run_dir(v, run_dir) for v in obj]
    if isinstance(obj, dict):
        return {k: _fill_run_dir(v, run_dir) for k, v in obj.items()}
    if isinstance(obj, msgspec.Struct):
        for name in obj.__struct_fields__:
            if name != "dir":
                setattr(obj, name, _fill_run_dir(getattr(obj, name), run_dir))
    return obj
