"""Every example that ``agentrl --help`` or a subcommand's ``--help`` prints is run, and must work.

An example is the text after ``e.g.`` or ``like`` in an argument's help: a whole option (``--set KEY=VALUE``)
or a value of the option it documents. Each one runs through the real parser and the command's own code up
to the point where it would start serving: commands that read a run config run with ``--print-config`` (the
resolved config must hold the example's value); the trajectory readers build their filter and start position
from it. A dotted ``package.module:name`` is imported. An example no runner below knows fails the test, so a
new kind of example needs a way to be run before it can be printed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from agentrl import cli
from agentrl.config.loader import parse_override
from agentrl.inspect.cli import filter_from, start_from
from agentrl.plugins import load_object

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = re.compile(r"(?:\be\.g\.|\blike) (.+?)(?=\s\(|[,;)]|$)")
DOTTED = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
# what a command needs besides the example: argument dest -> its argv (left out when the example gives it)
REQUIRED: dict[str, dict[str, list[str]]] = {"run": {"config_file": ["configs/quickstart.yaml"]},
                                             "export": {"output": ["-o", "out.jsonl"]}}
READERS = {"tail", "export", "inspect", "view"}


def subparsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    found = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += subparsers(sub, (*path, name))
    return found


def collect() -> list[tuple[tuple[str, ...], argparse.Action, str]]:
    out = []
    for path, parser in subparsers(cli.build_parser()):
        texts = [(a, a.help or "") for a in parser._actions]
        for action, text in texts:
            out += [(path, action, m.group(1).strip()) for m in EXAMPLE.finditer(" ".join(text.split()))]
        for text in (parser.description or "", parser.epilog or ""):
            assert not EXAMPLE.search(text), f"agentrl {' '.join(path)}: an example outside an argument's help"
    return out


EXAMPLES = collect()


def example_argv(action: argparse.Action, example: str) -> list[str]:
    words = shlex.split(example)
    if words[0].startswith("-"):
        return words
    assert len(words) == 1, f"a value example must be one word: {example!r}"
    return [action.option_strings[-1], words[0]] if action.option_strings else words


def test_examples_are_found() -> None:
    shown = {(p[0] if p else "", e) for p, _, e in EXAMPLES}
    assert ("controller", "--set learner.optim.lr=1e-5") in shown
    assert ("run", "--set training.max_steps=10") in shown
    assert ("worker", "agents.tool_agent:run_episode") in shown


def print_config(argv: list[str]) -> dict[str, Any]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        cli.main([*argv, "--print-config"])
    assert exit_.value.code == 0, f"agentrl {' '.join(argv)} --print-config exited {exit_.value.code}"
    config = yaml.safe_load(out.getvalue())
    assert isinstance(config, dict)
    return config


def lookup(config: dict[str, Any], keys: list[str]) -> Any:
    node: Any = config
    for key in keys:
        node = node[key]
    return node


@pytest.mark.parametrize(("path", "action", "example"), EXAMPLES, ids=[f"{' '.join(p)}: {e}" for p, _, e in EXAMPLES])
def test_help_example_runs(path: tuple[str, ...], action: argparse.Action, example: str,
                           monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(REPO)
    extra = example_argv(action, example)
    required = REQUIRED.get(path[0] if path else "", {})
    argv = [*path, *(w for dest, words in required.items() if dest != action.dest for w in words), *extra]
    for word in extra:
        value = word.partition("=")[2] if "=" in word and not word.startswith("-") else word
        if DOTTED.match(value):
            assert load_object(value, what=f"the example {example!r}") is not None
    if path and path[0] in READERS:
        args = cli.build_parser().parse_args(argv)
        filter_from(args)
        start_from(args)
        return
    config = print_config(argv)
    if extra[0] == "--set":
        keys, value = parse_override(extra[1])
        assert lookup(config, keys) == value
    else:
        value = extra[-1].rpartition("=")[2]  # NAME=PATH: the path is the value
        assert value in yaml.safe_dump(config) or Path(value).is_file()
