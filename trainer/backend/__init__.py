"""Training backends behind one small interface (:class:`~trainer.backend.base.TrainBackend`).

``torch`` (one process, CPU or one GPU) lives in :mod:`.torch_backend`; ``megatron`` (megatron-core,
tensor/pipeline/data parallel over several ranks) in :mod:`.megatron`. :func:`open_backend` picks one by
``learner.backend``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from agentrl.config.learner import LearnerConfig
from trainer.backend.base import StepResult, TrainBackend
from trainer.backend.torch_backend import TorchBackend, build_torch_backend

__all__ = ["StepResult", "TorchBackend", "TrainBackend", "build_torch_backend", "open_backend"]


@contextlib.contextmanager
def open_backend(cfg: LearnerConfig, seed: int = 0) -> Iterator[TrainBackend]:
    """The backend ``cfg.backend`` names, ready to train; a megatron backend's ranks stop on exit."""
    if cfg.backend == "megatron":
        from trainer.backend.megatron.launch import open_megatron_backend

        with open_megatron_backend(cfg, seed) as backend:
            yield backend
        return
    yield build_torch_backend(cfg)
