"""Packed micro-batches in Megatron's THD layout: one row of tokens, sequence boundaries as ``cu_seqlens``.

:func:`to_thd` turns a :class:`~trainer.packing.MicroBatch` (sequences concatenated, positions restarting at
0) into the model's inputs: token ids ``[1, T']`` and a :class:`PackedBatch` carrying the cumulative
sequence lengths for the varlen attention kernel and the RoPE angles of every token's position. ``T'`` is
``T`` rounded up to ``pad_to`` (sequence parallelism splits tokens evenly over TP ranks); the padding is
one extra sequence of token 0 that attends only to itself and whose outputs are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.backend.megatron._mcore import PackedSeqParams
from trainer.packing import MicroBatch

__all__ = ["PackedBatch", "rope_tables", "to_thd"]


@dataclass
class PackedBatch(PackedSeqParams):  # megatron-core is untyped (Any)
    """Megatron's packed-sequence parameters plus what our core attention needs (RoPE angles per token)."""

    rope_cos: torch.Tensor | None = None  # [T', 1, head_dim] float32
    rope_sin: torch.Tensor | None = None
    seq_lens: tuple[int, ...] = ()  # including the padding sequence, if any
    num_tokens: int = 0  # real tokens (before padding)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``/``sin`` ``[T, 1, head_dim]`` (float32) of rotary embeddings at integer ``positions`` ``[T]``.

    The rotate-half convention of Hugging Face Llama / Qwen2: frequencies ``theta^(-2i/d)`` for the first
    half of the dimensions, repeated for the second.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float()
                               / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([angles, angles], dim=-1)[:, None, :]
    return emb.cos(), emb.sin()


def to_thd(mb: MicroBatch, *, head_dim: int, theta: float, pad_to: int = 1,
           device: torch.device | str = "cpu") -> tuple[torch.Tensor, PackedBatch]:
    """Token ids ``[1, T']`` and the :class:`PackedBatch` of ``mb`` on ``device`` (``T'`` a multiple of ``pad_to``)."""
    if pad_to < 1:
        raise ValueError(f"to_thd: pad_to must be >= 1, got {pad_to}")
    total = mb.num_tokens
    pad = -total % pad_to
    lens = [*mb.seq_lens, pad] if pad else list(mb.seq_lens)
    ids = mb.input_ids[0]
    positions = mb.position_ids[0]
    if pad:
        ids = torch.cat([ids, ids.new_zeros(pad)])
        positions = torch.cat([positions, torch.arange(pad, dtype=positions.dtype)])
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens, dtype=torch.int32).cumsum(0)
    cos, sin = rope_tables(positions.to(device), head_dim, theta)
    cu = cu.to(device)
    return ids[None].to(device), PackedBatch(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(lens), max_seqlen_kv=max(lens),
        rope_cos=cos, rope_sin=sin, seq_lens=tuple(lens), num_tokens=total,
    )
