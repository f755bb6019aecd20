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
from agentrl.config.tracking import TrackingConfig
from agentrl.config.training import TrainingConfig
from agentrl.config.worker import EnvdConfig, WorkerConfig

__all__ = ["NatsConfig", "RunConfig"]


class NatsConfig(Section):
    """Where the bus is, and how the embedded server is set up when none is given."""

    url: str | None = None
    """nats://host:4222, or a cluster's servers comma-separated (nats://a:4222,nats://b:4222,...); None starts
    the embedded nats-server"""
    connect_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    """timeout of one connection attempt"""
    connect_attempts: Annotated[int, msgspec.Meta(ge=1)] = 10
    """connection attempts before an actor gives up"""
    max_payload_mb: Annotated[int, msgspec.Meta(ge=1, le=64)] = 8
    """largest message the embedded server accepts"""
    stream_max_age_s: Annotated[float, msgspec.Meta(ge=0)] = 7 * 24 * 3600.0
    """trajectories older than this are removed from the streams; 0 = kept forever"""
    replicas: Annotated[int, msgspec.Meta(ge=0, le=5)] = 0
    """JetStream replicas of the run's streams, KV and object store; 0 = auto: 3 on a cluster of 3 or more
    servers, else 1"""
    max_deliver: Annotated[int, msgspec.Meta(ge=1)] = 20
    """deliveries before a message is dead-lettered"""
    ack_wait_s: Annotated[float, msgspec.Meta(gt=0)] = 300.0
    """a task held by a worker that died is redelivered after this (live workers heartbeat)"""
    credentials: str | None = None
    """this actor's credentials file (agentrl/bus/auth.py); else $AGENTRL_NATS_CREDENTIALS"""
    auth: bool = True
    """`agentrl run` with its embedded server: per-actor users and permissions made at launch"""
    tls: bool = False
    """`agentrl run` with its embedded server: TLS on the client port, certificates made at launch"""


class RunConfig(Section):
    """Everything about one run."""

    name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]+$")] = "default"
    """run name: the bus namespace agentrl.<name> and the {name} of dir"""
    dir: str = "runs/{name}"
    """run directory; {name} is replaced by the run name. A relative path is relative to the directory the
    command runs in (not to the config file): run every actor of a run from the same folder, or give an
    absolute path"""
    seed: int = 0
    """seed of every actor (data shuffling, sampling, initialization)"""
    nats: NatsConfig = msgspec.field(default_factory=NatsConfig)
    """where the bus is"""
    training: TrainingConfig = msgspec.field(default_factory=TrainingConfig)
    """the training contract the controller and the learner share"""
    engine: EngineConfig = msgspec.field(default_factory=EngineConfig)
    """the embedded engine and how engines are reached"""
    controller: ControllerConfig = msgspec.field(default_factory=ControllerConfig)
    """the controller: prompts, admission, APRIL, eval passes"""
    learner: LearnerConfig = msgspec.field(default_factory=LearnerConfig)
    """the learner (and agentrl sft): model, algorithm, optimizer, outputs"""
    worker: WorkerConfig = msgspec.field(default_factory=WorkerConfig)
    """agent workers: the agent, its environments and concurrency"""
    envd: EnvdConfig = msgspec.field(default_factory=EnvdConfig)
    """env workers: environments served over NATS"""
    launch: LaunchConfig = msgspec.field(default_factory=LaunchConfig)
    """agentrl run: which actors it starts and how"""
    tracking: TrackingConfig = msgspec.field(default_factory=TrackingConfig)
    """experiment tracking: TensorBoard and Weights & Biases sinks beside the JSONL metrics"""

    def __post_init__(self) -> None:
        _fill_run_dir(self, str(self.run_dir))

    @property
    def run_dir(self) -> Path:
        return Path(self.dir.format(name=self.name))


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
