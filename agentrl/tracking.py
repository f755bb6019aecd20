"""Experiment tracking: metric records sent to TensorBoard and Weights & Biases beside the JSONL files.

An actor opens its sinks once (:func:`open_tracking`, from the ``tracking:`` config section) and hands every
metrics record to :meth:`Tracking.log` with its step (the learner's step, the controller's policy version).
Only numbers are sent (booleans as 0/1); nested or text values stay in the JSONL file. Both sinks write in the
background (TensorBoard's event-file thread, W&B's service process), so logging does not block the event loop;
opening and closing a W&B run take seconds: call them off the loop (``asyncio.to_thread``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from agentrl.config.tracking import TrackingConfig
from agentrl.errors import ConfigError

__all__ = ["Sink", "TensorBoardSink", "Tracking", "WandbSink", "numeric", "open_tracking", "without_secrets"]

log = logging.getLogger(__name__)


class Sink(Protocol):
    """One metrics destination."""

    def log(self, values: Mapping[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def numeric(values: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a record (booleans as 0/1); everything else is left out."""
    out = {}
    for key, value in values.items():
        if isinstance(value, bool | int | float) and math.isfinite(float(value)):
            out[key] = float(value)
    return out


class TensorBoardSink:
    """Scalars into a TensorBoard event file under ``logdir`` (tensorboard's own writer; TensorFlow not needed)."""

    def __init__(self, logdir: Path) -> None:
        try:
            from tensorboard.compat.proto.event_pb2 import Event
            from tensorboard.compat.proto.summary_pb2 import Summary
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
        except ImportError as exc:
            raise ConfigError(_missing("tracking.tensorboard", "tensorboard")) from exc
        self._event, self._summary = Event, Summary
        logdir.mkdir(parents=True, exist_ok=True)
        self._writer = EventFileWriter(str(logdir))
        self.logdir = logdir

    def log(self, values: Mapping[str, float], step: int) -> None:
        summary = self._summary(value=[self._summary.Value(tag=k, simple_value=v) for k, v in values.items()])
        self._writer.add_event(self._event(wall_time=time.time(), step=step, summary=summary))

    def close(self) -> None:
        self._writer.close()


class WandbSink:
    """One W&B run per actor (named ``<run>-<source>``, grouped by the run name), with the resolved config.

    Charts use ``<source>/step`` as their x axis (W&B's own step only counts records), so records whose step
    repeats or goes back (an eval report for an older version) are kept, not dropped.
    """

    def __init__(self, cfg: TrackingConfig, *, run_name: str, source: str, config: Mapping[str, Any]) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise ConfigError(_missing("tracking.wandb", "wandb")) from exc
        Path(cfg.wandb_dir).mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(console="off", silent=True, x_disable_stats=True)
        self.run = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, group=run_name,
                              name=f"{run_name}-{source}", job_type=source, dir=cfg.wandb_dir, mode=cfg.wandb_mode,
                              config=without_secrets(config), settings=settings)
        self.step_key = f"{source}/step"
        self.run.define_metric(self.step_key)
        self.run.define_metric("*", step_metric=self.step_key)

    def log(self, values: Mapping[str, float], step: int) -> None:
        self.run.log({**values, self.step_key: step})

    def close(self) -> None:
        """Finish the run and stop W&B's service process: only then is everything on disk (offline) or sent."""
        import wandb

        self.run.finish()
        wandb.teardown()


class Tracking:
    """The sinks an actor logs to; a sink that fails is logged once and dropped (metrics never stop training)."""

    def __init__(self, sinks: list[Sink] | None = None) -> None:
        self.sinks = list(sinks or [])

    def log(self, values: Mapping[str, Any], step: int) -> None:
        numbers = numeric(values)
        if not numbers:
            return
        for sink in list(self.sinks):
            try:
                sink.log(numbers, step)
            except Exception as exc:
                log.warning("tracking: %s failed (%s); it gets no further metrics", type(sink).__name__, exc)
                self.sinks.remove(sink)

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:
                log.warning("tracking: closing %s failed: %s", type(sink).__name__, exc)
        self.sinks = []


def open_tracking(
    cfg: TrackingConfig, *, run_name: str, source: str, config: Mapping[str, Any] | None = None
) -> Tracking:
    """The sinks ``cfg`` turns on for actor ``source`` (``learner``, ``controller``); none is an empty Tracking.
    A sink whose package is missing is a :class:`~agentrl.errors.ConfigError` saying what to install."""
    sinks: list[Sink] = []
    if cfg.tensorboard:
        sinks.append(TensorBoardSink(Path(cfg.tensorboard_dir) / source))
    if cfg.wandb:
        sinks.append(WandbSink(cfg, run_name=run_name, source=source, config=config or {}))
    return Tracking(sinks)


def without_secrets(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` without keys (at any depth) that hold credentials: ``*api_key``, ``credentials``."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if key.endswith("api_key") or key == "credentials":
            continue
        out[key] = without_secrets(value) if isinstance(value, Mapping) else value
    return out


def _missing(key: str, package: str) -> str:
    return f"{key} is on but the {package} package is not installed: pip install -e '.[tracking]'"
