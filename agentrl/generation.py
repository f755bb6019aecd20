"""The token-in/token-out generation contract between agent loops and engines.

Agents depend only on :class:`Generator`; the engine client (one engine or a
router over many) implements it, and unit tests implement it in a few lines.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

import msgspec
import numpy as np

from agentrl.messages import SamplingParams

__all__ = ["FinishReason", "GenerateOutput", "Generator"]

FinishReason = Literal["stop", "length", "abort"]


class GenerateOutput(msgspec.Struct, kw_only=True):
    """What one ``/generate`` call produced.

    ``output_ids``, ``logprobs`` and ``versions`` are aligned (one entry per generated
    token); ``versions[i]`` is the engine's weight version when token ``i`` was sampled.
    ``logprobs`` are ``log_softmax(logits / temperature)`` of the sampled token, before
    top-k / top-p truncation.
    """

    output_ids: np.ndarray  # int32
    logprobs: np.ndarray  # float32
    versions: np.ndarray  # int32
    text: str = ""
    finish_reason: FinishReason = "stop"
    matched_stop: int | str | None = None
    prompt_tokens: int = 0
    weight_version: int = 0
    rid: str = ""
    engine_id: str = ""

    def __post_init__(self) -> None:
        self.output_ids = np.asarray(self.output_ids, dtype=np.int32)
        self.logprobs = np.asarray(self.logprobs, dtype=np.float32)
        self.versions = np.asarray(self.versions, dtype=np.int32)
        n = {len(self.output_ids), len(self.logprobs), len(self.versions)}
        if len(n) != 1:
            raise ValueError(
                f"generate output misaligned: output_ids={len(self.output_ids)}, "
                f"logprobs={len(self.logprobs)}, versions={len(self.versions)}"
            )


class Generator(Protocol):
    """Anything that can generate tokens from tokens (engine client, router, test fake)."""

    async def generate(
        self,
        input_ids: Sequence[int] | np.ndarray,
        sampling: SamplingParams,
        *,
        rid: str | None = None,
        session_id: str | None = None,
    ) -> GenerateOutput:
        """Generate a continuation of ``input_ids``; an aborted request returns what it had, finish ``abort``."""
        ...
