"""``sdpa_varlen``: attention for packed rows that runs causal SDPA on each sequence separately.

Registered with transformers' attention interface, it lets any HF model that routes attention through that
interface (Qwen2, Llama, ...) train on padding-free packed rows without the dense ``T × T`` block-diagonal mask
that plain ``sdpa`` builds from packed position ids: each sequence gets ``is_causal=True`` SDPA (flash or
memory-efficient kernels on GPU), so compute is ``Σ L_i²`` rather than ``T²``, and no flash-attn package is
needed. Sequence lengths come from the ``packed_seq_lens`` keyword that :class:`TorchBackend` passes to the
model, or else from the position ids (a new sequence starts at position 0).

It ignores ``attention_mask``: use it only for packed rows without padding (what the backend feeds it).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

__all__ = ["VARLEN", "register", "sdpa_varlen_attention"]

VARLEN = "sdpa_varlen"


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
    gqa = query.shape[1] != key.shape[1]
    outs = []
    start = 0
    for n in lens:
        sl = slice(start, start + n)
        outs.append(F.scaled_dot_product_attention(
            query[:, :, sl], key[:, :, sl], value[:, :, sl], dropout_p=dropout, is_causal=True, scale=scaling,
            enable_gqa=gqa,
        ))
        start += n
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make ``attn_implementation="sdpa_varlen"`` available to transformers models (idempotent)."""
    AttentionInterface.register(VARLEN, sdpa_varlen_attention)


register()
