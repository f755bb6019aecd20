"""Decode attention over the paged KV pool: one new query token per row, split-K over the row's keys (Triton).

A decode step reads, for row ``b``, only its ``lens[b]`` keys/values (pool indices ``table[b, :lens[b]]``),
instead of gathering the whole context and masking it. Each program of the first kernel handles one
``(row, kv_head, split)`` and all ``heads // kv_heads`` query heads of that group at once (padded to 16 rows
for ``tl.dot``); it writes its partial softmax (normalised output and log-sum-exp) per split, and a second
kernel combines the splits of each ``(row, head)``. With one split the first kernel writes the output itself.

The number of splits depends only on ``(rows, kv_heads, table width)`` and the device, never on ``lens``, so a
CUDA graph can capture a step; the keys of a row are divided over the splits on the device (each split at
least ``MIN_SPLIT_BLOCKS`` key blocks), and programs past a row's length exit at once. ``lens[b] == 0`` marks
an idle row: its output is zeros and nothing of it is read.

:func:`paged_decode_attention_reference` is the obvious gather + softmax computation the tests compare with.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from agentrl.engine.triton_mode import interpreted
from agentrl.errors import EngineError

__all__ = ["default_num_splits", "paged_decode_attention", "paged_decode_attention_reference"]

BLOCK_N = 64  # keys per inner step
MIN_SPLIT_BLOCKS = 2  # a split covers at least this many key blocks (the last one of a row may be shorter)
MAX_SPLITS = 64
PROGRAMS_PER_SM = 4
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _split_len(n, num_splits, BLOCK: tl.constexpr, MIN_BLOCKS: tl.constexpr):  # type: ignore[no-untyped-def]
    """Keys per split for a row of ``n`` keys: whole blocks, at least ``MIN_BLOCKS`` of them."""
    per_split = tl.cdiv(tl.cdiv(n, num_splits), BLOCK) * BLOCK
    return tl.maximum(per_split, MIN_BLOCKS * BLOCK)


@triton.jit
def _attend(  # type: ignore[no-untyped-def]
    Q, K, V, Table, b, kvh, lo, hi, scale, sq_b, sq_h, sk_p, sk_h, sv_p, sv_h, st_r, st_c, heads, gmask, d, dmask,
    GROUP_PAD: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK: tl.constexpr, DOT_F32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Attention of row ``b``'s query heads ``heads`` over its keys ``lo..hi-1``: (output, log-sum-exp)."""
    q = tl.load(Q + b * sq_b + heads[:, None] * sq_h + d[None, :], mask=gmask[:, None] & dmask[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    total = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    for start in range(lo, hi, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < hi
        idx = tl.load(Table + b * st_r + offs * st_c, mask=valid, other=0)
        kv_mask = valid[:, None] & dmask[None, :]
        k = tl.load(K + idx[:, None] * sk_p + kvh * sk_h + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + idx[:, None] * sv_p + kvh * sv_h + d[None, :], mask=kv_mask, other=0.0)
        if DOT_F32:
            k, v = k.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        total = total * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    return acc / total[:, None], m + tl.log(total)


@triton.jit
def _split_kernel(  # type: ignore[no-untyped-def]
    Q, K, V, Table, Lens, MidO, MidLse, Out, scale, num_splits,
    sq_b, sq_h, sk_p, sk_h, sv_p, sv_h, st_r, st_c, so_b, so_h,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    BLOCK: tl.constexpr, MIN_BLOCKS: tl.constexpr, DIRECT: tl.constexpr, DOT_F32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One (row, kv head, split): its partial output and log-sum-exp to MidO/MidLse, or (DIRECT, one split) the
    output itself to Out, zeros for an idle row."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    n = tl.load(Lens + b)
    chunk = _split_len(n, num_splits, BLOCK, MIN_BLOCKS)
    lo = split * chunk
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, DIM_PAD)
    heads = kvh * GROUP + g
    gmask = g < GROUP
    dmask = d < HEAD_DIM
    omask = gmask[:, None] & dmask[None, :]
    out_ptr = Out + b * so_b + heads[:, None] * so_h + d[None, :]
    if lo < n:
        out, lse = _attend(
            Q, K, V, Table, b, kvh, lo, tl.minimum(lo + chunk, n), scale, sq_b, sq_h, sk_p, sk_h, sv_p, sv_h,
            st_r, st_c, heads, gmask, d, dmask, GROUP_PAD, DIM_PAD, BLOCK, DOT_F32, PRECISION,
        )
        if DIRECT:
            tl.store(out_ptr, out.to(Out.dtype.element_ty), mask=omask)
        else:
            mid = (b * tl.num_programs(1) * GROUP + heads) * num_splits + split  # row of mid [B, H, splits, D]
            tl.store(MidO + mid[:, None] * HEAD_DIM + d[None, :], out, mask=omask)
            tl.store(MidLse + mid, lse, mask=gmask)
    elif DIRECT:
        tl.store(out_ptr, tl.zeros([GROUP_PAD, DIM_PAD], Out.dtype.element_ty), mask=omask)


@triton.jit
def _combine_kernel(  # type: ignore[no-untyped-def]
    MidO, MidLse, Lens, Out, num_splits, so_b, so_h,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK: tl.constexpr, MIN_BLOCKS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, DIM_PAD)
    dmask = d < HEAD_DIM
    n = tl.load(Lens + b)
    out = tl.zeros([DIM_PAD], tl.float32)
    if n > 0:
        active = tl.cdiv(n, _split_len(n, num_splits, BLOCK, MIN_BLOCKS))
        sp = tl.arange(0, SPLITS_PAD)
        smask = sp < active
        base = (b * tl.num_programs(1) + h) * num_splits
        lse = tl.load(MidLse + base + sp, mask=smask, other=float("-inf"))
        weight = tl.exp(lse - tl.max(lse, 0))
        o = tl.load(MidO + (base + sp)[:, None] * HEAD_DIM + d[None, :], mask=smask[:, None] & dmask[None, :], other=0.0)
        out = tl.sum(weight[:, None] * o, 0) / tl.sum(weight, 0)
    tl.store(Out + b * so_b + h * so_h + d, out.to(Out.dtype.element_ty), mask=dmask)


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # the CPU interpreter: any small grid will do
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def default_num_splits(batch: int, kv_heads: int, context: int, device: torch.device) -> int:
    """Splits per (row, kv head) so the grid holds ~``PROGRAMS_PER_SM`` programs per SM; static for a shape."""
    want = math.ceil(PROGRAMS_PER_SM * _sm_count(device) / max(batch * kv_heads, 1))
    most = math.ceil(context / (MIN_SPLIT_BLOCKS * BLOCK_N))
    return max(1, min(want, most, MAX_SPLITS))


def _check(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: torch.Tensor, lens: torch.Tensor) -> None:
    if q.dim() != 3 or k_pool.dim() != 3 or v_pool.shape != k_pool.shape:
        raise EngineError(
            f"decode attention wants q [B, H, D] and k/v pools [P, KVH, D] of one shape; got q {tuple(q.shape)}, "
            f"k {tuple(k_pool.shape)}, v {tuple(v_pool.shape)}"
        )
    (batch, heads, dim), kv_heads = q.shape, k_pool.shape[1]
    if k_pool.shape[2] != dim or heads % kv_heads:
        raise EngineError(f"q {tuple(q.shape)} does not fit pools {tuple(k_pool.shape)} (head_dim, heads % kv_heads)")
    if q.dtype not in _DTYPES or k_pool.dtype != q.dtype or v_pool.dtype != q.dtype:
        raise EngineError(f"q/k/v dtypes must be one of float16, bfloat16, float32 and agree; got {q.dtype}, "
                          f"{k_pool.dtype}, {v_pool.dtype}")
    if table.dim() != 2 or table.dtype != torch.int64 or table.shape[0] < batch:
        raise EngineError(f"table must be int64 [R >= {batch}, C]; got {table.dtype} {tuple(table.shape)}")
    if lens.shape != (batch,) or lens.dtype != torch.int32:
        raise EngineError(f"lens must be int32 [{batch}]; got {lens.dtype} {tuple(lens.shape)}")
    if len({t.device for t in (q, k_pool, v_pool, table, lens)}) != 1:
        raise EngineError("q, k_pool, v_pool, table and lens must be on one device")
    if k_pool.stride(2) != 1 or v_pool.stride(2) != 1 or q.stride(2) != 1:
        raise EngineError("q and the pools must be contiguous along head_dim")


def paged_decode_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    table: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
    *,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Attention of one query per row over its paged keys: ``[B, H, D]`` in q's dtype (float32 accumulation).

    ``q [B, H, D]`` (after rotary), ``k_pool``/``v_pool [P, KVH, D]`` (strided views are fine), ``table [R, C]``
    int64 pool index of each position of row ``b < R``, ``lens [B]`` int32 keys of row ``b`` (positions
    ``0..lens[b]-1``; 0 = idle row, output zeros; at most ``C``, unchecked: reading ``lens`` would sync the
    host). Query head ``h`` attends kv head ``h // (H // KVH)``.
    ``num_splits`` (default :func:`default_num_splits`) must not depend on ``lens`` under a CUDA graph.
    Raises :class:`EngineError` on a wrong shape, dtype or device.
    """
    _check(q, k_pool, v_pool, table, lens)
    (batch, heads, dim), kv_heads = q.shape, k_pool.shape[1]
    splits = default_num_splits(batch, kv_heads, table.shape[1], q.device) if num_splits is None else num_splits
    if not 1 <= splits <= MAX_SPLITS:
        raise EngineError(f"num_splits must be in 1..{MAX_SPLITS}; got {splits}")
    group = heads // kv_heads
    dim_pad = triton.next_power_of_2(dim)
    out = torch.empty((batch, heads, dim), dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    direct = splits == 1  # the split kernel writes the output; no partials, no combine
    mid_o = out if direct else torch.empty((batch, heads, splits, dim), dtype=torch.float32, device=q.device)
    mid_lse = out if direct else torch.empty((batch, heads, splits), dtype=torch.float32, device=q.device)
    # Triton 3.9's interpreter multiplies 16-bit float operands of tl.dot as integers: there the kernel gives
    # tl.dot float32 copies (the same products a GPU's bf16 dot accumulates in float32).
    dot_f32 = interpreted() and q.dtype != torch.float32
    _split_kernel[(batch, kv_heads, splits)](
        q, k_pool, v_pool, table, lens, mid_o, mid_lse, out, scale, splits,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1),
        table.stride(0), table.stride(1), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=dim, DIM_PAD=dim_pad,
        BLOCK=BLOCK_N, MIN_BLOCKS=MIN_SPLIT_BLOCKS, DIRECT=direct, DOT_F32=dot_f32,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    if direct:
        return out
    _combine_kernel[(batch, heads)](
        mid_o, mid_lse, lens, out, splits, out.stride(0), out.stride(1),
        HEAD_DIM=dim, DIM_PAD=dim_pad, BLOCK=BLOCK_N, MIN_BLOCKS=MIN_SPLIT_BLOCKS,
        SPLITS_PAD=max(2, triton.next_power_of_2(splits)),
    )
    return out


def paged_decode_attention_reference(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    table: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """What :func:`paged_decode_attention` computes, row by row: gather the row's keys, softmax in float32."""
    batch, heads, dim = q.shape
    group = heads // k_pool.shape[1]
    out = torch.zeros((batch, heads, dim), dtype=torch.float32, device=q.device)
    for b in range(batch):
        idx = table[b, : int(lens[b])]
        if idx.numel() == 0:
            continue
        keys = k_pool[idx].float().repeat_interleave(group, dim=1)  # [n, H, D]
        values = v_pool[idx].float().repeat_interleave(group, dim=1)
        weights = torch.softmax(torch.einsum("hd,nhd->hn", q[b].float(), keys) * scale, dim=-1)
        out[b] = torch.einsum("hn,nhd->hd", weights, values)
    return out.to(q.dtype)
