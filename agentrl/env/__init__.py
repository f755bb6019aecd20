"""Environments: the reset/step/close contract, in-process providers, and (in submodules)
the NATS client :mod:`agentrl.env.remote` and the env worker server :mod:`agentrl.env.server`."""

from agentrl.env.base import Action, Environment, Observation, RewardFn, StepResult, ToolCall
from agentrl.env.local import ChainedEnvs, EnvFactory, EnvProvider, LocalEnvs

__all__ = [
    "Action",
    "ChainedEnvs",
    "EnvFactory",
    "EnvProvider",
    "Environment",
    "LocalEnvs",
    "Observation",
    "RewardFn",
    "StepResult",
    "ToolCall",
]
