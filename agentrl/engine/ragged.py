"""Causal attention over ragged (packed) sequences: queries of many sequences in one row, no padding.

Sequence ``b`` has ``cu_q[b+1] - cu_q[b]`` queries, the last tokens of its ``cu_k[b+1] - cu_k[b]`` keys (a prefill
continues a cached prefix: fewer queries than keys), and query ``i`` sees the keys up to its own position — the
causal mask aligned to the bottom right. Two ways:

- :func:`flash_varlen`: PyTorch's flash-attention varlen kernel (``torch.nn.attention.varlen``), one launch for the
  whole row, GQA without repeating keys; CUDA, bf16/fp16. The learner's packed training (``trainer.backend``) uses
  it too, with as many queries as keys.
- :func:`per_sequence`: one SDPA call per sequence with an explicit bottom-right mask (any device and dtype), with
  cuDNN attention left out: recent PyTorch builds prefer it on Hopper, and it builds an execution plan for every
  new shape, which ragged batches bring at every step.
"""

from __future__ import annotations

import functools
import logging
from inspect import signature
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["PER_SEQUENCE_BACKENDS", "flash_varlen", "per_sequence", "ragged_attention", "varlen_available"]

log = logging.getLogger(__name__)

# per-sequence SDPA: every backend but cuDNN's, whose plan is built (slowly) for each new sequence length
PER_SEQUENCE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@functools.cache
def varlen_available() -> bool:
    """True when PyTorch ships the flash varlen attention and a GPU can run it."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@functools.cache
def _varlen_kwargs() -> dict[str, Any]:
    """Causal masking across torch versions: ``is_causal=True`` (2.9-2.12) or a (-1, 0) window (newer)."""
    from torch.nn.attention.varlen import varlen_attn

    params = signature(varlen_attn).parameters
    kwargs: dict[str, Any] = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    return kwargs


def flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                 max_q: int, max_k: int, scale: float | None) -> torch.Tensor:
    """Causal attention of THD tensors ``q [Tq, heads, d]`` over ``k``/``v`` ``[Tk, groups, d]`` by sequence
    (``cu_q``/``cu_k``: int32 ``[n + 1]`` on the device); ``[Tq, heads, d]``. One flash varlen launch."""
    from torch.nn.attention.varlen import varlen_attn

    out = varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, **_varlen_kwargs())
    return out[0] if isinstance(out, tuple) else out


def per_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_lens: list[int], k_lens: list[int],
                 scale: float | None) -> torch.Tensor:
    """What :func:`flash_varlen` computes, one SDPA call per sequence (lengths as host lists)."""
    gqa = q.shape[1] != k.shape[1]
    outs, qs, ks = [], 0, 0
    with sdpa_kernel(PER_SEQUENCE_BACKENDS):
        for nq, nk in zip(q_lens, k_lens, strict=True):
            mask = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(nk - nq)  # bottom-right causal
            out = F.scaled_dot_product_attention(q[qs : qs + nq].transpose(0, 1), k[ks : ks + nk].transpose(0, 1),
                                                 v[ks : ks + nk].transpose(0, 1), attn_mask=mask, scale=scale,
                                                 enable_gqa=gqa)
            outs.append(out.transpose(0, 1))
            qs, ks = qs + nq, ks + nk
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def ragged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                     q_lens: list[int], k_lens: list[int], scale: float | None) -> torch.Tensor:
    """:func:`flash_varlen` where it runs (CUDA, half precision) and masks as :func:`per_sequence` does, else
    :func:`per_sequence`."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and varlen_available() \
            and (q_lens == k_lens or flash_aligns_bottom_right(q.device, q.dtype)):
        return flash_varlen(q, k, v, cu_q, cu_k, max(q_lens), max(k_lens), scale)
    return per_sequence(q, k, v, q_lens, k_lens, scale)


@functools.cache
def flash_aligns_bottom_right(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this PyTorch's flash varlen kernel aligns its causal mask to the bottom right when a sequence has
    fewer queries than keys (a prefill continuing a cached prefix), checked once against :func:`per_sequence` on
    a small input. The varlen API is young and has changed between releases; where it masks otherwise, prefixes
    are attended to one sequence at a time instead (logged)."""
    gen = torch.Generator(device=device).manual_seed(0)
    q_lens, k_lens = [3, 2], [7, 2]
    q = torch.randn(sum(q_lens), 2, 64, generator=gen, device=device, dtype=dtype)
    k, v = (torch.randn(sum(k_lens), 1, 64, generator=gen, device=device, dtype=dtype) for _ in range(2))
    cu_q, cu_k = (torch.tensor([0, n[0], sum(n)], dtype=torch.int32, device=device) for n in (q_lens, k_lens))
    flash = flash_varlen(q, k, v, cu_q, cu_k, max(q_lens), max(k_lens), None).float()
    ok = bool(torch.allclose(flash, per_sequence(q, k, v, q_lens, k_lens, None).float(), rtol=2e-2, atol=2e-2))
    if not ok:
        log.warning("torch.nn.attention.varlen does not align the causal mask to the bottom right in this "
                    "PyTorch (%s): prefills that continue a cached prefix attend one sequence at a time", torch.__version__)
    return ok
