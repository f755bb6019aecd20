"""Config of a local run started by ``agentrl run``: how many of each actor, and steps run first."""

from __future__ import annotations

from typing import Annotated

import msgspec

from agentrl.config.loader import Section

__all__ = ["LaunchConfig", "StepConfig"]


class StepConfig(Section):
    """A command run to completion before the actors start (model init, data generation, SFT warm-up).

    ``argv`` and ``skip_if_exists`` may use ``{run_dir}``, ``{config}`` (the resolved config file),
    ``{seed}`` (the run's seed) and ``{python}``; a leading ``agentrl`` runs this installation's CLI. The step is skipped when
    ``skip_if_exists`` names a path that exists (so a restarted run does not redo it).
    """

    name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]+$")]
    argv: list[str]
    skip_if_exists: str | None = None


class LaunchConfig(Section):
    """Which actors a local run starts, and how it treats their failures."""

    engines: Annotated[int, msgspec.Meta(ge=0)] = 1  # 0: use engine.client.urls (e.g. real SGLang servers)
    workers: Annotated[int, msgspec.Meta(ge=1)] = 1
    envd: Annotated[int, msgspec.Meta(ge=0)] = 1  # started only when envd.envs names environments
    max_restarts: Annotated[int, msgspec.Meta(ge=0)] = 3  # per actor, then the run stops with a report
    grace_s: Annotated[float, msgspec.Meta(gt=0)] = 15.0  # SIGTERM -> SIGKILL on stop
    engine_ready_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 300.0
    steps: list[StepConfig] = msgspec.field(default_factory=list)
