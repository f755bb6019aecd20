"""Opening environments by name: in-process factories, remote env workers, or both.

The runtime asks an :class:`EnvProvider` for a fresh environment per episode;
the agent never knows whether it runs in-process or in ``agentrl envd``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

from agentrl.env.base import Environment
from agentrl.errors import ConfigError, EnvCrashed

__all__ = ["ChainedEnvs", "EnvFactory", "EnvProvider", "LocalEnvs"]

EnvFactory = Callable[[], Environment]
"""A zero-argument callable (usually the environment class) returning a fresh environment."""


class EnvProvider(Protocol):
    """Opens one environment per episode; ``session_id`` is the trajectory id."""

    def has(self, name: str) -> bool: ...

    def open(self, name: str, session_id: str) -> Environment: ...


class LocalEnvs:
    """Environments that run in the agent worker's own process, by name."""

    def __init__(self, factories: Mapping[str, EnvFactory]) -> None:
        self._factories = dict(factories)

    def has(self, name: str) -> bool:
        return name in self._factories

    def open(self, name: str, session_id: str) -> Environment:
        factory = self._factories.get(name)
        if factory is None:
            raise ConfigError(f"environment {name!r}: not configured (known: {sorted(self._factories)})")
        return factory()


class ChainedEnvs:
    """The first provider that knows an environment name opens it."""

    def __init__(self, *providers: EnvProvider) -> None:
        self._providers = providers

    def has(self, name: str) -> bool:
        return any(p.has(name) for p in self._providers)

    def open(self, name: str, session_id: str) -> Environment:
        return self._provider(name).open(name, session_id)

    def attach(self, name: str, session: str, server: str) -> Environment:
        """Re-attach to an env-worker session (see :class:`~agentrl.env.remote.RemoteEnvs`)."""
        provider = self._provider(name)
        if not hasattr(provider, "attach"):
            raise EnvCrashed(f"environment {name!r}: runs in-process here; no env-worker session to attach to")
        env: Environment = provider.attach(name, session, server)
        return env

    def _provider(self, name: str) -> EnvProvider:
        for p in self._providers:
            if p.has(name):
                return p
        raise ConfigError(f"environment {name!r}: no in-process factory and no env worker configured for it")
