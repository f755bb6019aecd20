"""Our core attention for megatron-core's local spec: RoPE, then causal attention within each packed sequence.

Megatron's local ``DotProductAttention`` materialises ``[b, heads, s, s]`` scores and refuses packed
sequences; its THD RoPE splits the row per sequence on the host. :class:`VarlenAttention` replaces both
(the model is built with ``position_embedding_type="none"``, and this module applies the rotary embedding
from the per-token angles in :class:`~trainer.backend.megatron.thd.PackedBatch`):

- ``varlen``: PyTorch's flash-attention varlen kernel over the whole packed row (``cu_seqlens``), one launch
  per layer, GQA without repeating K/V (CUDA only);
- ``sdpa``: one causal ``scaled_dot_product_attention`` per sequence (any device; the CPU path).

Inputs are Megatron's THD tensors ``[T, heads, head_dim]`` (query) and ``[T, groups, head_dim]`` (key, value)
of this TP rank's heads; the output is ``[T, heads, head_dim]``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

from agentrl.engine.ragged import PER_SEQUENCE_BACKENDS, flash_varlen, varlen_available
from trainer.backend.compiled_layers import grad_mode_invariant
from trainer.backend.megatron._mcore import MCORE_ERROR
from trainer.backend.megatron.thd import PackedBatch

__all__ = ["VarlenAttention", "apply_rope", "fused_rope_qk", "resolve_kernel", "rope_qk", "varlen_available"]

if MCORE_ERROR is None:
    from megatron.core.transformer.module import MegatronModule
else:  # pure helpers below still import
    MegatronModule = torch.nn.Module


def resolve_kernel(name: str, device: torch.device) -> str:
    """``auto`` → ``varlen`` on a GPU with the kernel, else ``sdpa``; ``varlen`` elsewhere is an error."""
    if name == "auto":
        return "varlen" if device.type == "cuda" and varlen_available() else "sdpa"
    if name == "varlen" and (device.type != "cuda" or not varlen_available()):
        from agentrl.errors import ConfigError

        raise ConfigError("config key learner.megatron.attention: varlen needs CUDA and torch.nn.attention.varlen")
    return name


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[T, heads, d]`` by the angles ``cos``/``sin`` ``[T, 1, d]`` (cast to ``x``'s dtype, as HF does)."""
    return x * cos.to(x.dtype) + _rotate_half(x) * sin.to(x.dtype)


def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
            sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`apply_rope` of the query and the key."""
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


@functools.cache
def fused_rope_qk() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """:func:`rope_qk` compiled into one kernel per direction (instead of ~10 elementwise ones per tensor), with
    the same roundings when the learner scores under ``no_grad`` as in training (see ``grad_mode_invariant``)."""
    return grad_mode_invariant(torch.compile(rope_qk, dynamic=True, fullgraph=True), (0, 1))


def _sdpa_per_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: tuple[int, ...],
                       scale: float) -> torch.Tensor:
    gqa = q.shape[1] != k.shape[1]
    outs = []
    with sdpa_kernel(PER_SEQUENCE_BACKENDS):  # cuDNN builds a plan per new length
        for qs, ks, vs in zip(q.split(lens), k.split(lens), v.split(lens), strict=True):
            out = F.scaled_dot_product_attention(qs.transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1),
                                                 is_causal=True, scale=scale, enable_gqa=gqa)
            outs.append(out.transpose(0, 1))
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def _varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: PackedBatch, scale: float) -> torch.Tensor:
    cu, longest = packed.cu_seqlens_q, packed.max_seqlen_q
    return flash_varlen(q, k, v, cu, cu, longest, longest, scale)


class VarlenAttention(MegatronModule):
    """Megatron core-attention module (built through a ``ModuleSpec``) for packed THD batches."""

    def __init__(self, config: Any, layer_number: int, attn_mask_type: Any, attention_type: str,
                 kernel: str = "sdpa", fused_rope: bool = False, **_: Any) -> None:
        super().__init__(config=config)
        if kernel not in ("varlen", "sdpa"):
            raise ValueError(f"VarlenAttention: kernel must be varlen or sdpa, got {kernel!r}")
        self.kernel = kernel
        self.rope = fused_rope_qk() if fused_rope else rope_qk
        self.scale = 1.0 / config.kv_channels ** 0.5

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
                attn_mask_type: Any = None, attention_bias: Any = None,
                packed_seq_params: PackedBatch | None = None) -> torch.Tensor:
        packed = packed_seq_params
        if not isinstance(packed, PackedBatch) or packed.rope_cos is None or packed.rope_sin is None:
            raise ValueError("VarlenAttention needs a PackedBatch with RoPE tables (see trainer.backend.megatron.thd)")
        query, key = self.rope(query, key, packed.rope_cos, packed.rope_sin)
        if self.kernel == "varlen":
            return _varlen(query, key, value, packed, self.scale)
        return _sdpa_per_sequence(query, key, value, packed.seq_lens, self.scale)
