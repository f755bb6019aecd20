"""Shared pytest fixtures live in tests/fixtures/, one module per subsystem."""

from __future__ import annotations

import pytest

pytest_plugins = ["tests.fixtures.engine", "tests.fixtures.nats", "tests.fixtures.envs", "tests.fixtures.learner", "tests.fixtures.controller"]

# The longest modules, longest first (a whole quickstart with its SFT warm-up takes ~9 minutes): collected
# first, so that with two workers (`-n 2 --dist loadfile --no-loadscope-reorder`, which keeps this order) they
# start at once beside everything else instead of being the tail of the run.
FIRST = (
    "tests/e2e/test_run.py",
    "tests/faults/test_fault_matrix.py",
    "tests/multihost/test_ray_nats_cluster.py",
    "tests/integration/test_controller_restart.py",
    "tests/integration/test_kernel_eval.py",
    "tests/e2e/test_tutorial.py",
    "tests/integration/test_weight_sync_run.py",
)


def _rank(item: pytest.Item) -> int:
    return next((i for i, name in enumerate(FIRST) if str(item.path).endswith(name)), len(FIRST))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=_rank)  # stable: the rest keep their order
