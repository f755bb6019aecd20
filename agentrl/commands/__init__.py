"""Subcommands of the ``agentrl`` CLI, one module each (see :mod:`agentrl.cli`)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agentrl.config.run import RunConfig

__all__ = ["Command", "add_common_arguments", "add_print_config_argument", "add_set_argument", "load_run_config",
           "print_config", "setup_logging"]


@dataclass(frozen=True)
class Command:
    """One subcommand: its name, one-line help, how to add its arguments and how to run it."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments every actor takes: a config file, ``--set`` overrides, the NATS URL and the run name."""
    p.add_argument("--config", "-c", default=None, help="YAML config file (see configs/)")
    add_set_argument(p)
    p.add_argument(
        "--nats", default=None, metavar="URL",
        help="NATS server URL (nats://host:4222); without it a local embedded server is started",
    )
    p.add_argument("--run", default=None, help="run name (namespace on the bus); overrides run.name")
    add_print_config_argument(p)


def add_set_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set learner.optim.lr=1e-5 (repeatable; every key: docs/reference)",
    )


def add_print_config_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (file, --set, flags) as YAML and exit without starting anything")


def load_run_config(
    args: argparse.Namespace, flags: Mapping[str, str] | None = None, extra: Sequence[str] = ()
) -> RunConfig:
    """The run config from ``--config`` and ``--set``, then command flags, then ``--run``.

    ``flags`` maps an argument name to the config key it sets (``{"model": "engine.model"}``); flags
    left at ``None`` (or an empty list) are not applied. ``extra`` are further ``KEY=VALUE`` overrides.
    """
    from agentrl.config.loader import load_config
    from agentrl.config.run import RunConfig

    overrides = [*args.overrides]
    for attr, key in (flags or {}).items():
        value = getattr(args, attr, None)
        if value is None or value == []:
            continue
        overrides.append(f"{key}=[{','.join(map(str, value))}]" if isinstance(value, list) else f"{key}={value}")
    overrides += extra
    if getattr(args, "run", None):
        overrides.append(f"name={args.run}")
    cfg = load_config(RunConfig, getattr(args, "config", None), overrides)
    if getattr(args, "print_config", False):
        print_config(cfg)
    return cfg


def print_config(cfg: RunConfig) -> None:
    """``--print-config``: the resolved config on stdout, then exit 0 (as ``--help`` does)."""
    import msgspec
    import yaml

    sys.stdout.write(yaml.safe_dump(msgspec.to_builtins(cfg), sort_keys=False))
    sys.stdout.flush()
    raise SystemExit(0)


def setup_logging() -> None:
    """The log format every actor uses (its stderr goes to ``<run_dir>/logs/<actor>.log`` under ``agentrl run``)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
