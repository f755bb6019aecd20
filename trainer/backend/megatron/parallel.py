"""One learner rank's place in the TP × PP × DP grid, and the process groups it talks over.

:func:`init_parallel` joins the process group (NCCL on GPUs, gloo on CPU), lets megatron-core build its
tensor/pipeline/data-parallel groups (TP fastest, then DP, then PP: megatron's default order), and makes a
gloo group over all ranks for the leader's commands and results (Python objects).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from agentrl.config.megatron import MegatronConfig
from trainer.backend.megatron._mcore import require

__all__ = ["Rank", "init_parallel", "shutdown_parallel"]


@dataclass(frozen=True)
class Rank:
    """Where this process sits: global rank, its TP/PP/DP coordinates and sizes, its device."""

    rank: int
    world: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp: int
    pp: int
    dp: int
    device: torch.device
    control: Any  # gloo group over all ranks (objects)

    @property
    def first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def reports(self) -> bool:
        """True on the rank whose loss metrics count for its DP replica (last stage, TP rank 0)."""
        return self.last_stage and self.tp_rank == 0


def _device(use_cuda: bool) -> torch.device:
    if not use_cuda:
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", "0")) % max(torch.cuda.device_count(), 1)
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def init_parallel(cfg: MegatronConfig, rank: int, world: int, *, use_cuda: bool, port: int, seed: int = 0) -> Rank:
    """Join the ``world``-rank learner at ``cfg.master_addr:port`` as ``rank`` and build the parallel groups."""
    require()
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    if world != cfg.world_size:
        raise ValueError(f"world size {world} != tensor_parallel*pipeline_parallel*data_parallel = {cfg.world_size}")
    # Megatron's TP layers overlap their all-reduce with the weight-gradient GEMM only with one CUDA work queue.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    device = _device(use_cuda)
    backend = cfg.dist_backend if cfg.dist_backend != "auto" else ("nccl" if use_cuda else "gloo")
    timeout = datetime.timedelta(seconds=cfg.timeout_s)
    dist.init_process_group(backend, init_method=f"tcp://{cfg.master_addr}:{port}", rank=rank, world_size=world,
                            timeout=timeout, device_id=device if device.type == "cuda" else None)
    ps.initialize_model_parallel(tensor_model_parallel_size=cfg.tensor_parallel,
                                 pipeline_model_parallel_size=cfg.pipeline_parallel)
    if use_cuda:
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    control = dist.new_group(backend="gloo", timeout=timeout)
    return Rank(rank=rank, world=world, tp_rank=ps.get_tensor_model_parallel_rank(),
                pp_rank=ps.get_pipeline_model_parallel_rank(), dp_rank=ps.get_data_parallel_rank(),
                tp=cfg.tensor_parallel, pp=cfg.pipeline_parallel, dp=cfg.data_parallel, device=device,
                control=control)


def shutdown_parallel() -> None:
    """Leave the process group (idempotent)."""
    from megatron.core import parallel_state as ps

    if dist.is_initialized():
        ps.destroy_model_parallel()
        dist.destroy_process_group()
