"""Training backends behind one small interface (:class:`~trainer.backend.base.TrainBackend`).

``torch`` (one process, CPU or one GPU) lives here; FSDP2 and Megatron-core backends implement the same
Protocol.
"""

from trainer.backend.base import StepResult, TrainBackend
from trainer.backend.torch_backend import TorchBackend, build_torch_backend

__all__ = ["StepResult", "TorchBackend", "TrainBackend", "build_torch_backend"]
