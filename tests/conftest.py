"""Shared pytest fixtures live in tests/fixtures/, one module per subsystem."""

pytest_plugins = ["tests.fixtures.engine", "tests.fixtures.nats", "tests.fixtures.envs", "tests.fixtures.learner", "tests.fixtures.controller"]
