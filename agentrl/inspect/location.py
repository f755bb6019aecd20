"""Which run to inspect, and where its bus is: a run directory, a run name, a config file, or a NATS URL."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agentrl.bus.subjects import validate_run_name
from agentrl.config.loader import load_config
from agentrl.config.run import RunConfig
from agentrl.errors import ConfigError

__all__ = ["RunLocation", "resolve_run"]


@dataclass(frozen=True)
class RunLocation:
    """A run to read: its name (the bus namespace), its directory if local, a NATS URL if given, its config."""

    name: str
    run_dir: Path | None = None
    url: str | None = None
    config: RunConfig | None = None

    @property
    def store_dir(self) -> Path | None:
        """The run's JetStream store (``<run_dir>/nats``), if the run is local."""
        return self.run_dir / "nats" if self.run_dir is not None else None


def _run_dir_of(run: str, runs_root: Path) -> Path | None:
    for candidate in (Path(run), runs_root / run):
        if candidate.is_dir():
            return candidate
    return None


def _from_dir(run_dir: Path, overrides: list[str], url: str | None) -> RunLocation:
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        name = validate_run_name(run_dir.resolve().name)
        return RunLocation(name, run_dir, url, None)
    cfg = load_config(RunConfig, config_file, overrides)
    return RunLocation(cfg.name, run_dir, url or cfg.nats.url, cfg)


def resolve_run(
    run: str | None, *, config: str | None = None, overrides: list[str] | None = None,
    url: str | None = None, runs_root: Path = Path("runs"),
) -> RunLocation:
    """Find the run named by ``run`` (a run directory, or a name under ``runs_root``), by ``config``, or on ``url``.

    A run directory's ``config.yaml`` (written by ``agentrl run``) gives the run's name and settings; a
    directory without one is named after itself. Raises ConfigError naming what was looked for.
    """
    overrides = list(overrides or [])
    if config is not None:
        cfg = load_config(RunConfig, config, overrides + ([f"name={run}"] if run else []))
        return RunLocation(cfg.name, cfg.run_dir, url or cfg.nats.url, cfg)
    if run is None:
        raise ConfigError("name the run to inspect: a run directory, a run name under runs/, or --config FILE")
    run_dir = _run_dir_of(run, runs_root)
    if run_dir is not None:
        return _from_dir(run_dir, overrides, url)
    if url is not None:
        try:
            return RunLocation(validate_run_name(run), None, url, None)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
    raise ConfigError(
        f"run {run!r}: no directory {run} or {runs_root / run}; pass a run directory, "
        "--config FILE, or --nats URL with the run's name"
    )
