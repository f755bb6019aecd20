"""Shared pytest fixtures live in tests/fixtures/, one module per subsystem."""

from __future__ import annotations

import pytest

pytest_plugins = ["tests.fixtures.engine", "tests.fixtures.nats", "tests.fixtures.envs", "tests.fixtures.learner", "tests.fixtures.controller"]

# The longest module (a whole quickstart with its SFT warm-up): collected first, so that with two workers
# (`-n 2 --dist loadfile`) it starts at once beside everything else instead of being the tail of the run.
FIRST = ("tests/e2e/test_run.py",)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: not any(str(item.path).endswith(name) for name in FIRST))
