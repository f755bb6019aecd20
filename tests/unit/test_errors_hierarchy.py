"""Every exception the runtime raises on purpose derives from the one hierarchy in agentrl/errors.py."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import agentrl
from agentrl.agent.context import EpisodeAborted
from agentrl.errors import AgentRLError

# EpisodeAborted is control flow an agent's `except Exception` must not swallow: a BaseException on purpose.
ALLOWED = {EpisodeAborted}


def test_public_exceptions_of_the_runtime_derive_from_agentrl_error() -> None:
    offenders = []
    for info in pkgutil.walk_packages(agentrl.__path__, prefix="agentrl."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == module.__name__
                    and not name.startswith("_") and obj not in ALLOWED and not issubclass(obj, AgentRLError)):
                offenders.append(f"{module.__name__}.{name}")
    assert offenders == []
