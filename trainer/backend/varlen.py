"""``sdpa_varlen``: attention for packed rows that runs causal SDPA on each sequence separately.

Registered with transformers' attention interface, it lets any HF model that routes attention through that
interface (Qwen2, Llama, ...) train on padding-free packed rows without the dense ``T × T`` block-diagonal mask
that plain ``sdpa`` builds from packed position ids: each sequence gets ``is_causal=True`` SDPA (flash or
memory-efficient kernels on GPU), so compute is ``Σ L_i²`` rather than ``T²``, and no flash-attn package is
needed. Sequence lengths come from the ``packed_seq_lens`` keyword that :class:`TorchBackend` passes to the
model, or else from the position ids (a new sequence starts at position 0).

On a GPU, in bf16 or fp16, the whole packed row goes through PyTorch's flash-attention varlen kernel instead
(``torch.nn.attention.varlen``, one launch per layer with ``cu_seqlens``): a loop of per-sequence SDPA calls costs
a launch and Python work per sequence, and on recent PyTorch builds SDPA prefers cuDNN attention on Hopper, which
builds an execution plan for every new sequence length — an RL batch brings new lengths every step. Where the
varlen kernel is missing (CPU, float32, an older PyTorch), each sequence gets SDPA with cuDNN left out.

It ignores ``attention_mask``: use it only for packed rows without padding (what the backend feeds it).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel
from transformers import AttentionInterface

from agentrl.engine.ragged import PER_SEQUENCE_BACKENDS, flash_varlen, varlen_available

__all__ = ["VARLEN", "register", "sdpa_varlen_attention"]

VARLEN = "sdpa_varlen"


def _flash_dtype(query: torch.Tensor, dropout: float) -> torch.dtype | None:
    """The half dtype the flash varlen kernel would run in here (autocast's, as SDPA would cast to), or None."""
    if not query.is_cuda or dropout != 0.0 or not varlen_available():
        return None
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else query.dtype
    return dtype if dtype in (torch.float16, torch.bfloat16) else None


@functools.lru_cache(maxsize=4)
def _cu_seqlens(lens: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Cumulative lengths on ``device`` (cached: every layer of a micro-batch asks for the same ones)."""
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.as_tensor(lens, dtype=torch.int32).cumsum(0)
    return cu.to(device, non_blocking=True)


def _lengths(kwargs: dict[str, Any], total: int) -> list[int]:
    lens = kwargs.get("packed_seq_lens")
    if lens is not None:
        return list(lens)
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        return [total]
    starts = torch.nonzero(position_ids[0] == 0).flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    return [b - a for a, b in zip(starts, [*starts[1:], total], strict=True)]


def sdpa_varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention within each packed sequence of a ``[1, heads, T, head_dim]`` row; returns ``[1, T, heads, head_dim]``."""
    if query.shape[0] != 1:
        raise ValueError(f"{VARLEN} attention expects one packed row, got batch size {query.shape[0]}")
    total = query.shape[2]
    lens = _lengths(kwargs, total)
    if sum(lens) != total:
        raise ValueError(f"{VARLEN}: packed sequence lengths sum to {sum(lens)}, row has {total} tokens")
    dtype = _flash_dtype(query, dropout)
    if dtype is not None:
        q, k, v = (t[0].transpose(0, 1).to(dtype).contiguous() for t in (query, key, value))  # [T, heads, d]
        cu = _cu_seqlens(tuple(lens), query.device)
        out = flash_varlen(q, k, v, cu, cu, max(lens), max(lens), scaling)
        return out.unsqueeze(0), None
    return _per_sequence(query, key, value, lens, dropout, scaling), None


def _per_sequence(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, lens: list[int], dropout: float,
                  scaling: float | None) -> torch.Tensor:
    """One causal SDPA per sequence of a ``[1, heads, T, d]`` row (cuDNN left out); ``[1, T, heads, d]``."""
    gqa = query.shape[1] != key.shape[1]
    outs = []
    start = 0
    with sdpa_kernel(PER_SEQUENCE_BACKENDS):
        for n in lens:
            sl = slice(start, start + n)
            outs.append(F.scaled_dot_product_attention(
                query[:, :, sl], key[:, :, sl], value[:, :, sl], dropout_p=dropout, is_causal=True, scale=scaling,
                enable_gqa=gqa,
            ))
            start += n
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.transpose(1, 2).contiguous()


def register() -> None:
    """Make ``attn_implementation="sdpa_varlen"`` available to transformers models (idempotent)."""
    AttentionInterface.register(VARLEN, sdpa_varlen_attention)


register()
