"""The run's training contract, stored once in its KV bucket and checked by every actor that joins.

The first actor to join a run writes its ``training:`` section (:class:`~agentrl.config.training.TrainingConfig`)
under :data:`CONTRACT_KEY` with a create-only write; every later actor — under ``agentrl run`` or started by hand
from another file — compares its own section with the stored one and refuses to start on any difference, with
:class:`~agentrl.errors.ContractMismatch` naming each key and both values. A restarted actor of the same run
passes (same contract); a run that needs another contract is a new run (``--run NAME``).
"""

from __future__ import annotations

from typing import Any, Protocol

import msgspec

from agentrl.config.training import TrainingConfig
from agentrl.errors import ContractMismatch, VersionConflict

__all__ = ["CONTRACT_KEY", "differences", "join_contract"]

CONTRACT_KEY = "training.contract"


class ContractStore(Protocol):
    """The KV calls the contract needs (the Bus satisfies it)."""

    async def kv_get(self, key: str) -> bytes | None: ...
    async def kv_put(self, key: str, value: bytes, *, expected_revision: int | None = None) -> int: ...


def differences(stored: TrainingConfig, mine: TrainingConfig) -> list[str]:
    """``training.<key>: run has X, this actor has Y`` for every key that differs."""
    theirs, ours = msgspec.to_builtins(stored), msgspec.to_builtins(mine)
    keys = sorted(set(theirs) | set(ours))
    return [f"training.{k}: the run has {theirs.get(k)!r}, this actor has {ours.get(k)!r}"
            for k in keys if theirs.get(k) != ours.get(k)]


async def join_contract(kv: ContractStore, mine: TrainingConfig, *, actor: str) -> TrainingConfig:
    """Store ``mine`` as the run's contract if it has none; else check it. Returns the run's contract.

    Raises :class:`ContractMismatch` (naming every differing key and both values) when they disagree.
    """
    raw = await kv.kv_get(CONTRACT_KEY)
    if raw is None:
        try:
            await kv.kv_put(CONTRACT_KEY, _encode(mine), expected_revision=0)
            return mine
        except VersionConflict:  # another actor stored it first: check against theirs
            raw = await kv.kv_get(CONTRACT_KEY)
    stored = _decode(raw)
    diff = differences(stored, mine)
    if diff:
        raise ContractMismatch(
            f"{actor}: this run's training contract differs from this actor's config; refusing to start:\n  "
            + "\n  ".join(diff)
            + "\n(start every actor of a run from the same training: section, or use a new run name)"
        )
    return stored


def _encode(cfg: TrainingConfig) -> bytes:
    return msgspec.json.encode(cfg)


def _decode(raw: Any) -> TrainingConfig:
    return msgspec.json.decode(raw, type=TrainingConfig)
