"""Config of the Megatron-core learner backend (``learner.backend: megatron``): parallel layout and kernels.

The learner runs as ``tensor_parallel × pipeline_parallel × data_parallel`` ranks on one host (one GPU per
rank, or CPU processes with gloo). Rank 0 consumes the bus and hands every rank its micro-batches; the
micro-batch token budget is still ``learner.batch.max_tokens_per_micro_batch``.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from agentrl.config.loader import Section

__all__ = ["MegatronConfig"]


class MegatronConfig(Section):
    """Parallel sizes, precision and attention kernel of the Megatron-core backend."""

    tensor_parallel: Annotated[int, msgspec.Meta(ge=1)] = 1
    """TP: attention heads and MLP columns split"""
    pipeline_parallel: Annotated[int, msgspec.Meta(ge=1)] = 1
    """PP: decoder layers split into stages"""
    data_parallel: Annotated[int, msgspec.Meta(ge=1)] = 1
    """DP: micro-batches split, gradients reduced"""
    sequence_parallel: bool = False
    """with TP > 1: norms and dropout on token shards (less activation memory)"""
    distributed_optimizer: bool = True
    """fp32 master weights and Adam state sharded over DP ranks"""
    attention: Literal["auto", "varlen", "sdpa"] = "auto"
    """auto = flash varlen kernels over the packed sequences on GPU, one causal SDPA per sequence on CPU"""
    master_addr: str = "127.0.0.1"
    """address the ranks of one learner talk over"""
    master_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0
    """port the ranks of one learner talk over; must be free on the host (0 = pick a free one)"""
    dist_backend: Literal["auto", "nccl", "gloo"] = "auto"
    """auto = nccl on GPU, gloo on CPU"""
    timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 1800.0
    """a collective that waits longer fails the run"""

    @property
    def world_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel * self.data_parallel
