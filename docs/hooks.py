"""MkDocs hook: pages generated from the code at build time, so they cannot drift from it.

* ``reference/config.md``: every config key, its type, default and help text (:mod:`agentrl.config.reference`);
* ``reference/commands.md``: every ``agentrl`` command's ``--help``.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from mkdocs.structure.files import File, Files


def commands_markdown() -> str:
    from agentrl.cli import build_parser

    os.environ["COLUMNS"] = "110"  # argparse wraps help at the terminal width: make the page the same everywhere
    parser = build_parser()
    parts = ["# Commands\n", "Every `agentrl` command's `--help`, generated from the CLI.\n",
             "```text", parser.format_help().rstrip(), "```\n"]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                parts += [f"## `agentrl {name}`\n", "```text", sub.format_help().rstrip(), "```\n"]
    return "\n".join(parts)


def on_files(files: Files, config: Any) -> Files:
    from agentrl.config.reference import render_markdown
    from agentrl.config.run import RunConfig

    files.append(File.generated(config, "reference/config.md", content=render_markdown(RunConfig)))
    files.append(File.generated(config, "reference/commands.md", content=commands_markdown()))
    return files
