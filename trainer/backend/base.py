"""The interface every training backend implements: score, train one step, save/load, export."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from agentrl.config.learner import LossConfig
from trainer.losses import LossFn
from trainer.packing import MicroBatch

__all__ = ["StepResult", "TrainBackend"]


@dataclass
class StepResult:
    """What one optimizer step reports: summed loss metrics, grad norm, and train-vs-rollout logprob gaps."""

    metrics: dict[str, float] = field(default_factory=dict)
    grad_norm: float = 0.0
    lr: float = 0.0
    tokens: int = 0  # tokens forwarded (trained or not)
    logprob_diff_mean: float = 0.0  # |train - behaviour| logprob over trained tokens, before the update
    logprob_diff_max: float = 0.0


class TrainBackend(Protocol):
    """A model plus its optimizer. Micro-batches are packed sequences; the backend moves them to its device."""

    @property
    def vocab_size(self) -> int:
        """Token ids the model embeds: ``0 .. vocab_size - 1`` (a trajectory outside it is refused, not trained)."""
        ...

    def logprobs(self, mb: MicroBatch) -> torch.Tensor:
        """Per-token logprobs ``[T]`` (float32, CPU) under the current weights, without gradient."""
        ...

    def train_step(self, micro_batches: Sequence[MicroBatch], loss_fn: LossFn, cfg: LossConfig) -> StepResult:
        """Forward/backward every micro-batch (gradients accumulated), clip, and take one optimizer step."""
        ...

    def save_state(self, path: Path) -> None:
        """Write model, optimizer and scheduler state into the (existing, empty) directory ``path``."""
        ...

    def load_state(self, path: Path) -> None:
        """Restore what :meth:`save_state` wrote."""
        ...

    def export_hf(self, path: Path) -> None:
        """Write the policy in Hugging Face layout (config.json + safetensors) into directory ``path``."""
        ...
