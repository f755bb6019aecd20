"""Subcommands of the ``agentrl`` CLI, one module each (see :mod:`agentrl.cli`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Command", "add_common_arguments"]


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
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set learner.lr=1e-5 (repeatable)",
    )
    p.add_argument(
        "--nats", default=None, metavar="URL",
        help="NATS server URL (nats://host:4222); without it a local embedded server is started",
    )
    p.add_argument("--run", default=None, help="run name (namespace on the bus); overrides run.name")
