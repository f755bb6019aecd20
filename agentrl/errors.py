"""The one exception hierarchy of agentrl.

Lower libraries' errors (nats-py, aiohttp, msgspec, subprocess) are translated
once, at the boundary of the module that calls them, and re-raised ``from`` the
original so the cause stays visible::

    AgentRLError
    ├── ConfigError            bad key or value in a config file or --set override
    │   └── ContractMismatch   an actor's training section differs from the run's stored contract
    ├── DecodeError            bytes that are not a valid agentrl message
    │   └── SchemaVersionError a message written by a newer (or unknown) schema
    ├── BusError               NATS / JetStream failures
    │   ├── BusConnectError    could not reach the server within the retry budget
    │   ├── BusConfigConflict  an existing stream/bucket has a config that differs from ours
    │   ├── VersionConflict    compare-and-set on the policy version lost the race
    │   └── ServerError        the embedded nats-server could not start or is missing
    ├── EngineError            inference-engine failures (HTTP API)
    │   ├── EngineUnavailable  connection refused / 5xx / 429 after retries; retryable
    │   ├── EngineRequestError a 4xx: the request itself is wrong; never retried
    │   └── NoHealthyEngine    every engine of a router is down
    ├── EnvError               environment failures
    │   ├── EnvTimeout         a reset/step call exceeded its deadline
    │   └── EnvCrashed         the environment raised or its worker died
    ├── SandboxError           the code sandbox could not run the code at all
    ├── ProxyRequestError      an OpenAI call the recording proxy cannot record (bad body, history that does
    │                          not extend the episode's recorded conversation)
    ├── BackendError           a training backend failed (e.g. one rank of a multi-rank learner)
    └── WeightSyncError        a torch.distributed weight group could not form, or a broadcast failed or timed out
"""

from __future__ import annotations


class AgentRLError(Exception):
    """Base of every error agentrl raises on purpose."""


class ConfigError(AgentRLError, ValueError):
    """A config key or value is wrong; the message names the key, the value and what was expected."""


class ContractMismatch(ConfigError):
    """An actor's ``training:`` section differs from the contract stored for its run; names each key."""


class DecodeError(AgentRLError, ValueError):
    """Bytes that do not decode to the expected agentrl message."""


class SchemaVersionError(DecodeError):
    """A message carries a schema version this build of agentrl cannot read."""


class BusError(AgentRLError):
    """A NATS / JetStream operation failed."""


class BusConnectError(BusError):
    """The NATS server could not be reached within the retry budget."""


class BusConfigConflict(BusError):
    """An existing stream, KV bucket or object store has a config that conflicts with the run's."""


class VersionConflict(BusError):
    """A compare-and-set write lost: someone else wrote a newer value first."""


class ServerError(BusError):
    """The embedded nats-server binary is missing or failed to start."""


class EngineError(AgentRLError):
    """An inference engine request failed."""


class EngineUnavailable(EngineError):
    """The engine could not serve the request (connection error, 429 or 5xx) after bounded retries."""


class EngineRequestError(EngineError):
    """The engine rejected the request as malformed (HTTP 4xx other than 429)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class NoHealthyEngine(EngineError):
    """Every engine behind a router is marked unhealthy."""


class EnvError(AgentRLError):
    """An environment call failed."""


class EnvTimeout(EnvError):
    """An environment call did not finish before its deadline."""


class EnvCrashed(EnvError):
    """The environment raised, or the worker serving it died."""


class ResumeDiverged(EnvError):
    """A resumed agent that re-runs its episode from the start stepped other actions than it had recorded."""


class SandboxError(AgentRLError):
    """The sandbox could not execute the code (not: the code failed)."""


class ProxyRequestError(AgentRLError, ValueError):
    """A request to the recording OpenAI proxy that it refuses; the message names the field and what was wrong."""

    def __init__(self, message: str, *, param: str | None = None, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class BackendError(AgentRLError):
    """A training backend failed; for a multi-rank backend the message names the rank and its error."""


class WeightSyncError(AgentRLError):
    """A weight-update process group (torch.distributed) could not be formed, or a broadcast over it failed or
    timed out (a peer died, a rendezvous never completed); the message names the group and the cause."""
