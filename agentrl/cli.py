"""The ``agentrl`` command.

Each subcommand is a module in :mod:`agentrl.commands` that defines ``COMMAND``,
a :class:`~agentrl.commands.Command`, or a Command another package registers in the
``agentrl.commands`` entry-point group (the trainer's ``learner`` and ``sft``). Only modules that exist are listed in
``agentrl --help``, so the help never offers a subcommand that does not work.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from agentrl import __version__
from agentrl.commands import Command
from agentrl.errors import AgentRLError
from agentrl.plugins import load_object


def discover() -> list[Command]:
    """Every ``COMMAND`` defined by a module of :mod:`agentrl.commands`, plus the commands other installed
    packages register in the ``agentrl.commands`` entry-point group (the trainer's ``learner`` and ``sft``),
    sorted by name."""
    import agentrl.commands as pkg

    found = []
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"agentrl.commands.{info.name}")
        command = getattr(module, "COMMAND", None)
        if isinstance(command, Command):
            found.append(command)
    for _, target in plugin_commands():
        command = load_object(target, what="agentrl.commands entry point")
        if isinstance(command, Command):
            found.append(command)
    return sorted(found, key=lambda c: c.name)


def plugin_commands() -> list[tuple[str, str]]:
    """``(name, "module:attr")`` of the ``agentrl.commands`` entry points: from the installed distributions, or,
    when agentrl runs from a source tree that was never installed (``PYTHONPATH=.``), from its pyproject.toml."""
    found = [(e.name, e.value) for e in metadata.entry_points(group="agentrl.commands")]
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if found or not pyproject.is_file():
        return found
    table = tomllib.loads(pyproject.read_text()).get("project", {}).get("entry-points", {})
    return list(table.get("agentrl.commands", {}).items())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentrl", description="Asynchronous agentic RL post-training.")
    parser.add_argument("--version", action="version", version=f"agentrl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in discover():
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(p)
        p.set_defaults(_run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except AgentRLError as exc:
        print(f"agentrl {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
