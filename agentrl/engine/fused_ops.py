"""Fused Triton kernels for a decoder layer's small ops: residual add + RMSNorm, SiLU-and-mul, rotary.

Each kernel computes what the Hugging Face modules it replaces compute, rounding where they round (Qwen2 /
Llama conventions, transformers 5.x), so swapping one in changes no token a model samples:

- :func:`fused_add_rmsnorm` replaces ``hidden = residual + x`` followed by ``Qwen2RMSNorm(hidden)``: the sum
  is rounded to the input dtype, normalised in float32 and rounded to the input dtype, *then* multiplied by
  the weight (the product rounded to the promoted dtype of weight and input, as ``weight * normed`` is);
- :func:`silu_mul` replaces ``act_fn(gate_proj(x)) * up_proj(x)`` with ``act_fn`` SiLU: ``silu(gate)``
  rounded to the model dtype, then the product rounded;
- :func:`rotary_qk` replaces ``q * cos + rotate_half(q) * sin`` (and the same for k), rotate-half
  convention, every product and the sum rounded to the model dtype; it rotates ``q`` and ``k`` *in place*;
- :func:`rotary_qk_to_pool` rotates ``q`` in place and writes the rotated keys and the values straight into a
  layer of the paged KV pool at each row's pool index (no rotated ``k`` tensor, no index_put kernels).

A *row* is one token: decode passes ``[rows, ...]`` tensors (``rows`` = batch), prefill may flatten
``[batch, q_len]`` into rows. Inputs are inference tensors (the rotaries write in place; nothing here is
differentiable). Weights and epsilons are read at call time (pass ``norm.weight``, ``norm.variance_epsilon``),
so weights loaded into the HF modules in place are used by the next call, CUDA graphs included.

Each op has a pure-torch ``*_reference`` (the HF formula, op by op) that the tests compare with. Wrong
shapes, dtypes, devices or layouts raise :class:`~agentrl.errors.EngineError` naming the tensor.

Under Triton's CPU interpreter (``TRITON_INTERPRET=1``, tests) float32 -> bfloat16 casts truncate; there the
kernels round to nearest even by hand, as a GPU's conversion does, so CPU tests can compare bit patterns.

On a GPU every launch passes :data:`LAUNCH_OPTIONS` (``enable_fp_fusion=False``): with fusion on, Triton
(3.x default) contracts the rotary's ``round(x1 * c1) - round(x2 * s1)`` into ``fma.rn.bf16`` (``x1 * c1``
never rounded), which differed from HF's rotary in 23% of bf16 elements by one ulp on an H200; the test that
compiles every kernel for sm_90 checks the PTX holds no FMA.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from agentrl.engine.triton_mode import interpreted
from agentrl.errors import EngineError

__all__ = [
    "add_rmsnorm_reference",
    "fused_add_rmsnorm",
    "rotary_qk",
    "rotary_qk_reference",
    "rotary_qk_to_pool",
    "rotary_qk_to_pool_reference",
    "silu_mul",
    "silu_mul_reference",
]

MAX_HIDDEN = 65536  # one program holds a whole row of the norm
SILU_BLOCK = 1024  # columns per program of silu_mul
LAUNCH_OPTIONS: dict[str, Any] = {"enable_fp_fusion": False}  # every product rounded where HF rounds it
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _round(x, dtype: tl.constexpr, RTNE: tl.constexpr):  # type: ignore[no-untyped-def]
    """float32 ``x`` rounded to ``dtype``; ``RTNE``: round bfloat16 to nearest even by hand (the interpreter)."""
    if RTNE:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    return x.to(dtype)


@triton.jit
def _add_rmsnorm_kernel(  # type: ignore[no-untyped-def]
    X, R, W, Out, NewR, hidden, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, RTNE_IN: tl.constexpr, RTNE_OUT: tl.constexpr,
):
    """One row: NewR = round(X + R); Out = round(W * round(rmsnorm(NewR)))."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(X + row * hidden + cols, mask=mask, other=0.0)
    in_ty = X.dtype.element_ty
    if HAS_RESIDUAL:
        r = tl.load(R + row * hidden + cols, mask=mask, other=0.0)
        x = _round(x.to(tl.float32) + r.to(tl.float32), in_ty, RTNE_IN)
        tl.store(NewR + row * hidden + cols, x, mask=mask)
    h = x.to(tl.float32)
    variance = tl.sum(h * h, 0) / hidden
    normed = _round(h * tl.rsqrt(variance + eps), in_ty, RTNE_IN)
    w = tl.load(W + cols, mask=mask, other=0.0)
    out = _round(w.to(tl.float32) * normed.to(tl.float32), Out.dtype.element_ty, RTNE_OUT)
    tl.store(Out + row * hidden + cols, out, mask=mask)


@triton.jit
def _silu_mul_kernel(  # type: ignore[no-untyped-def]
    G, U, Out, width, stride_g, stride_u, BLOCK: tl.constexpr, RTNE: tl.constexpr,
):
    """Columns ``[pid1 * BLOCK, ...)`` of one row: Out = round(round(silu(G)) * U)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    ty = Out.dtype.element_ty
    act = _round(tl.math.div_rn(g, 1.0 + tl.exp(-g)), ty, RTNE)  # IEEE division, as torch's silu divides
    tl.store(Out + row * width + cols, _round(act.to(tl.float32) * u, ty, RTNE), mask=mask)


@triton.jit
def _rotate(  # type: ignore[no-untyped-def]
    x1, x2, c1, c2, s1, s2, ty: tl.constexpr, RTNE: tl.constexpr,
):
    """Both halves of ``x * cos + rotate_half(x) * sin``, each product and sum rounded to ``ty``."""
    f = tl.float32
    lo = _round(x1 * c1, ty, RTNE).to(f) - _round(x2 * s1, ty, RTNE).to(f)
    hi = _round(x2 * c2, ty, RTNE).to(f) + _round(x1 * s2, ty, RTNE).to(f)
    return _round(lo, ty, RTNE), _round(hi, ty, RTNE)


@triton.jit
def _rotary_heads(  # type: ignore[no-untyped-def]
    Src, Dst, src_head, dst_head, heads, c1, c2, s1, s2,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, HEADS_PAD: tl.constexpr, RTNE: tl.constexpr,
):
    """Rotate ``heads`` heads at ``Src`` (head stride ``src_head``) into ``Dst`` (head stride ``dst_head``)."""
    h = tl.arange(0, HEADS_PAD)
    d = tl.arange(0, HALF_PAD)
    mask = (h < heads)[:, None] & (d < HALF)[None, :]
    src = Src + h[:, None] * src_head + d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    lo, hi = _rotate(x1, x2, c1, c2, s1, s2, Dst.dtype.element_ty, RTNE)
    dst = Dst + h[:, None] * dst_head + d[None, :]
    tl.store(dst, lo, mask=mask)
    tl.store(dst + HALF, hi, mask=mask)


@triton.jit
def _rotary_kernel(  # type: ignore[no-untyped-def]
    Q, K, V, Cos, Sin, KOut, VOut, Where,
    q_heads, k_heads, sq_r, sq_h, sk_r, sk_h, sv_r, sv_h, sc_r, ss_r, sko_r, sko_h, svo_r, svo_h,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, QH_PAD: tl.constexpr, KH_PAD: tl.constexpr,
    TO_POOL: tl.constexpr, RTNE: tl.constexpr,
):
    """One row: rotate its q heads in place and its k heads into KOut (row ``Where[row]`` when TO_POOL, where
    V's heads are copied into VOut too; else KOut is K itself)."""
    row = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, HALF_PAD)
    dmask = d < HALF
    c1 = tl.load(Cos + row * sc_r + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(Cos + row * sc_r + HALF + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(Sin + row * ss_r + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(Sin + row * ss_r + HALF + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    q = Q + row * sq_r
    _rotary_heads(q, q, sq_h, sq_h, q_heads, c1, c2, s1, s2, HALF, HALF_PAD, QH_PAD, RTNE)
    out_row = row
    if TO_POOL:
        out_row = tl.load(Where + row)
        h = tl.arange(0, KH_PAD)
        e = tl.arange(0, 2 * HALF_PAD)
        mask = (h < k_heads)[:, None] & (e < 2 * HALF)[None, :]
        v = tl.load(V + row * sv_r + h[:, None] * sv_h + e[None, :], mask=mask, other=0.0)
        tl.store(VOut + out_row * svo_r + h[:, None] * svo_h + e[None, :], v, mask=mask)
    k_out = KOut + out_row * sko_r
    _rotary_heads(K + row * sk_r, k_out, sk_h, sko_h, k_heads, c1, c2, s1, s2, HALF, HALF_PAD, KH_PAD, RTNE)


def _rtne(dtype: torch.dtype) -> bool:
    """Whether a kernel must round to bfloat16 by hand (the interpreter truncates)."""
    return dtype == torch.bfloat16 and interpreted()


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _DTYPES:
        raise EngineError(f"{name} must be float16, bfloat16 or float32; got {t.dtype}")


def _check_same(names: str, tensors: list[torch.Tensor], *, shape: bool = True) -> None:
    first = tensors[0]
    if len({t.device for t in tensors}) != 1:
        raise EngineError(f"{names} must be on one device; got {[str(t.device) for t in tensors]}")
    if len({t.dtype for t in tensors}) != 1:
        raise EngineError(f"{names} must have one dtype; got {[str(t.dtype) for t in tensors]}")
    if shape and any(t.shape != first.shape for t in tensors):
        raise EngineError(f"{names} must have one shape; got {[tuple(t.shape) for t in tensors]}")


def _check_contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise EngineError(f"{name} must be contiguous; got strides {t.stride()} for shape {tuple(t.shape)}")


def _check_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor) -> None:
    _check_float("x", x)
    _check_float("weight", weight)
    if x.dim() < 1 or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise EngineError(f"fused_add_rmsnorm wants x [..., hidden] and weight [hidden]; got x {tuple(x.shape)}, "
                          f"weight {tuple(weight.shape)}")
    if x.shape[-1] > MAX_HIDDEN:
        raise EngineError(f"fused_add_rmsnorm supports hidden <= {MAX_HIDDEN}; got {x.shape[-1]}")
    _check_same("x and residual", [x] if residual is None else [x, residual])
    if weight.device != x.device:
        raise EngineError(f"weight must be on x's device {x.device}; got {weight.device}")
    for name, t in (("x", x), ("residual", residual), ("weight", weight)):
        if t is not None:
            _check_contiguous(name, t)


def fused_add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(normed, new_residual)``: ``new_residual = residual + x`` (``x`` itself when ``residual`` is None) and
    ``normed = Qwen2RMSNorm(new_residual)`` with this ``weight`` and ``eps``.

    ``x``, ``residual``: ``[..., hidden]`` contiguous, one dtype; ``weight``: ``[hidden]``. ``new_residual`` has
    x's dtype, ``normed`` the promoted dtype of weight and x (x's when they agree, as in a loaded model).
    Out of place: the inputs are left unchanged.
    """
    _check_norm(x, residual, weight)
    hidden = x.shape[-1]
    rows = x.numel() // max(hidden, 1)
    normed = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    new_residual = x if residual is None else torch.empty_like(x)
    if rows:
        block = triton.next_power_of_2(hidden)
        _add_rmsnorm_kernel[(rows,)](
            x, x if residual is None else residual, weight, normed, new_residual, hidden, float(eps),
            HAS_RESIDUAL=residual is not None, BLOCK=block, RTNE_IN=_rtne(x.dtype), RTNE_OUT=_rtne(normed.dtype),
            num_warps=min(max(block // 256, 1), 16), **LAUNCH_OPTIONS,
        )
    return normed, new_residual


def add_rmsnorm_reference(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """What :func:`fused_add_rmsnorm` computes, as the runner and HF's Qwen2RMSNorm compute it."""
    new_residual = x if residual is None else residual + x
    h = new_residual.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), new_residual


def _gate_and_up(gate: torch.Tensor, up: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate and up halves as ``[rows, width]`` views (rows strided when they come from one gate_up)."""
    _check_float("gate", gate)
    _check_contiguous("gate_up" if up is None else "gate", gate)
    if gate.dim() < 1:
        raise EngineError("silu_mul wants gate [..., width]; got a scalar")
    if up is None:
        if gate.shape[-1] % 2:
            raise EngineError(f"silu_mul(gate_up) wants an even last dimension; got {tuple(gate.shape)}")
        flat = gate.reshape(-1, gate.shape[-1])
        width = gate.shape[-1] // 2
        return flat[:, :width], flat[:, width:]
    _check_same("gate and up", [gate, up])
    _check_contiguous("up", up)
    return gate.reshape(-1, gate.shape[-1]), up.reshape(-1, up.shape[-1])


def silu_mul(gate: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(gate) * up`` in the inputs' dtype, as Qwen2MLP computes it before ``down_proj``.

    Either ``gate`` and ``up`` (``[..., width]``, contiguous, one shape and dtype), or one ``gate_up``
    ``[..., 2 * width]`` whose first half is the gate and second half the up projection. Returns
    ``[..., width]``.
    """
    g, u = _gate_and_up(gate, up)
    width = g.shape[1]
    out = torch.empty((*gate.shape[:-1], width), dtype=gate.dtype, device=gate.device)
    if g.shape[0] and width:
        block = min(SILU_BLOCK, triton.next_power_of_2(width))
        _silu_mul_kernel[(g.shape[0], triton.cdiv(width, block))](
            g, u, out, width, g.stride(0), u.stride(0), BLOCK=block, RTNE=_rtne(gate.dtype), num_warps=4,
            **LAUNCH_OPTIONS,
        )
    return out


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    """What :func:`silu_mul` computes: ``F.silu(gate) * up`` in the inputs' dtype."""
    if up is None:
        gate, up = gate.chunk(2, dim=-1)
    return F.silu(gate) * up


def _check_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    _check_float("q", q)
    if q.dim() != 3 or k.dim() != 3 or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise EngineError(f"rotary wants q [rows, heads, head_dim] and k [rows, kv_heads, head_dim]; got q "
                          f"{tuple(q.shape)}, k {tuple(k.shape)}")
    rows, _, dim = q.shape
    if dim % 2:
        raise EngineError(f"rotary wants an even head_dim; got {dim}")
    if cos.shape != (rows, dim) or sin.shape != (rows, dim):
        raise EngineError(f"rotary wants cos and sin [rows, head_dim] = [{rows}, {dim}] (one position per row); "
                          f"got cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    _check_same("q, k, cos and sin", [q, k, cos, sin], shape=False)
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if t.stride(-1) != 1:
            raise EngineError(f"{name} must be contiguous along head_dim; got strides {t.stride()}")


def _launch_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, v: torch.Tensor, k_out: torch.Tensor,
    v_out: torch.Tensor, where: torch.Tensor | None,
) -> None:
    rows, heads, dim = q.shape
    if not rows:
        return
    half = dim // 2
    _rotary_kernel[(rows,)](
        q, k, v, cos, sin, k_out, v_out, q if where is None else where, heads, k.shape[1],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0), sin.stride(0),
        k_out.stride(0), k_out.stride(1), v_out.stride(0), v_out.stride(1),
        HALF=half, HALF_PAD=triton.next_power_of_2(half), QH_PAD=triton.next_power_of_2(heads),
        KH_PAD=triton.next_power_of_2(k.shape[1]), TO_POOL=where is not None, RTNE=_rtne(q.dtype), num_warps=2,
        **LAUNCH_OPTIONS,
    )


def rotary_qk(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q [rows, heads, D]`` and ``k [rows, kv_heads, D]`` **in place** by each row's ``cos``/``sin``
    ``[rows, D]`` (HF's rotary embedding output for the row's position, in q's dtype); returns ``(q, k)``.

    Rotate-half convention: ``x * cos + rotate_half(x) * sin`` as HF's ``apply_rotary_pos_emb``. Rows and heads
    may be strided (views of one projection output); ``head_dim`` must be contiguous.
    """
    _check_rotary(q, k, cos, sin)
    _launch_rotary(q, k, cos, sin, k, k, k, None)
    return q, k


def _check_pool(k: torch.Tensor, v: torch.Tensor, kv: torch.Tensor, where: torch.Tensor) -> None:
    if v.shape != k.shape:
        raise EngineError(f"v must have k's shape {tuple(k.shape)}; got {tuple(v.shape)}")
    if kv.dim() != 4 or kv.shape[0] != 2 or kv.shape[2:] != k.shape[1:]:
        raise EngineError(f"kv must be one layer of the pool, [2, slots, kv_heads, head_dim] with kv_heads, head_dim "
                          f"= {tuple(k.shape[1:])}; got {tuple(kv.shape)}")
    if where.shape != (k.shape[0],) or where.dtype != torch.int64:
        raise EngineError(f"where must be int64 [{k.shape[0]}] (one pool index per row); got {where.dtype} "
                          f"{tuple(where.shape)}")
    _check_same("k, v and kv", [k, v, kv], shape=False)
    if where.device != k.device:
        raise EngineError(f"where must be on k's device {k.device}; got {where.device}")
    if v.stride(-1) != 1 or kv.stride(-1) != 1:
        raise EngineError("v and kv must be contiguous along head_dim")


def rotary_qk_to_pool(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv: torch.Tensor,
    where: torch.Tensor,
) -> torch.Tensor:
    """Rotate ``q`` in place and store the rotated ``k`` and ``v`` at ``kv[0, where[row]]``, ``kv[1, where[row]]``.

    ``q``, ``k``, ``cos``, ``sin`` as in :func:`rotary_qk`; ``v`` k's shape; ``kv [2, slots, kv_heads, D]`` one
    layer of the runner's pool (``runner.kv[layer]``); ``where`` int64 ``[rows]`` in ``0..slots-1`` (not
    checked on the device: it is read by the kernel, so checking would cost a host sync). Rows sharing a
    ``where`` (the scratch slot) store in no defined order. ``k`` and ``v`` are left unchanged; returns ``q``.
    """
    _check_rotary(q, k, cos, sin)
    _check_pool(k, v, kv, where)
    _launch_rotary(q, k, cos, sin, v, kv[0], kv[1], where)
    return q


def rotary_qk_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """What :func:`rotary_qk` computes, out of place: HF's ``apply_rotary_pos_emb`` with one position per row."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = q.shape[-1] // 2

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def rotary_qk_to_pool_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv: torch.Tensor,
    where: torch.Tensor,
) -> torch.Tensor:
    """What :func:`rotary_qk_to_pool` computes: the rotated q (a new tensor); ``kv`` is written in place."""
    q_rot, k_rot = rotary_qk_reference(q, k, cos, sin)
    kv[0][where] = k_rot
    kv[1][where] = v
    return q_rot
