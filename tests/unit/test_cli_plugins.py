"""The trainer's commands reach the CLI through entry points, or through pyproject.toml from a source tree."""

from __future__ import annotations

import pytest

import agentrl.cli as cli


def test_learner_and_sft_are_listed_installed_or_not(monkeypatch: pytest.MonkeyPatch) -> None:
    assert {c.name for c in cli.discover()} >= {"learner", "sft", "worker", "controller"}
    monkeypatch.setattr(cli.metadata, "entry_points", lambda group: [])  # a source tree run with PYTHONPATH=.
    assert dict(cli.plugin_commands()) == {"learner": "trainer.commands:LEARNER", "sft": "trainer.commands:SFT"}
    assert {c.name for c in cli.discover()} >= {"learner", "sft"}
