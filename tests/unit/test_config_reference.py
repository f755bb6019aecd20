"""The config reference is generated from the typed config: every key has help text, and the page shows it."""

from __future__ import annotations

from typing import Annotated

import msgspec

from agentrl.config.loader import Section
from agentrl.config.reference import field_docs, render_markdown, sections
from agentrl.config.run import RunConfig


def test_every_key_of_the_run_config_has_help_text() -> None:
    missing = [f"{sec.path}.{f.key}" for sec in sections(RunConfig) for f in sec.fields if not f.help]
    assert not missing, f"config keys without an attribute docstring: {missing}"


def test_the_run_directory_says_what_it_is_relative_to() -> None:
    (top,) = [sec for sec in sections(RunConfig) if sec.path == "(top level)"]
    (run_dir,) = [f for f in top.fields if f.key == "dir"]
    assert "relative to the directory the command runs in" in run_dir.help


def test_every_section_is_reached_once() -> None:
    paths = [sec.path for sec in sections(RunConfig)]
    for path in ("training", "learner.optim", "learner.loss", "controller.eval", "engine.client",
                 "worker.envs.<name>", "launch.steps[]"):
        assert path in paths
    assert len(paths) == len({sec.cls for sec in sections(RunConfig)})


class _Demo(Section):
    """A demo section."""

    rate: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.5
    """how often, as a fraction"""
    mode: str = "a"
    undocumented: int = 3
    items: list[int] = msgspec.field(default_factory=lambda: [1, 2])
    """a list
    over two lines"""


def test_field_docs_reads_attribute_docstrings_only() -> None:
    assert field_docs(_Demo) == {"rate": "how often, as a fraction", "items": "a list over two lines"}


def test_rows_show_type_bounds_default_and_help() -> None:
    (sec,) = sections(_Demo)
    rows = {f.key: f for f in sec.fields}
    assert (rows["rate"].kind, rows["rate"].default, rows["rate"].help) == ("float in (0, 1]", "0.5", "how often, as a fraction")
    assert rows["items"].default == "[1, 2]"


def test_the_page_has_a_row_per_key() -> None:
    page = render_markdown(RunConfig)
    assert "| `lr` | `float > 0` | `1e-06` | peak learning rate" in page
    assert "| `stale_policy` | `\"drop\" \\| \"mask\"` | `\"mask\"` |" in page
    assert "## `learner.optim` {#learner-optim}" in page
    assert "[`engine.client`](#engine-client)" in page
    rows = sum(1 for line in page.splitlines() if line.startswith("| `"))
    assert rows == sum(len(sec.fields) for sec in sections(RunConfig))
