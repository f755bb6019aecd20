"""Fused RMSNorm and SwiGLU for a Hugging Face llama-family model in training, by ``torch.compile``.

HF's ``Qwen2RMSNorm`` runs about six kernels forward and ten backward (cast to float32, square, mean, rsqrt,
multiply, cast back, weight product) and its MLP's ``act_fn(gate) * up`` three forward and more backward, each
reading and writing a ``[tokens, width]`` tensor: on a packed batch of 100k tokens the SwiGLU intermediate alone
is ~1 GB per tensor. Compiled, each becomes one fused kernel forward and one or two backward, keeping the HF
formula and its roundings (float32 normalisation, cast to the input dtype, then the weight product).

:func:`compile_layers` re-points the ``forward`` of every such module of one model instance (nothing global is
patched; parameters, names and state dicts are untouched). ``dynamic=True``: packed batches change length every
micro-batch without recompiling.

:func:`grad_mode_invariant` makes a compiled function compute the same bits with and without autograd: under
``no_grad`` (the learner scoring its own policy) Inductor builds an inference graph that may round differently
from the training graph (measured on CPU for RoPE in bf16: up to 0.03 apart), which would make the importance
ratio of a step against the learner's own scores differ from 1.
"""

from __future__ import annotations

from collections.abc import Callable
from types import MethodType
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["compile_layers", "grad_mode_invariant", "rms_norm", "swiglu"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's Qwen2RMSNorm / LlamaRMSNorm: normalise in float32, cast to ``x``'s dtype, then scale by ``weight``."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def grad_mode_invariant(fn: Callable[..., Any], grad_args: tuple[int, ...]) -> Callable[..., Any]:
    """``fn`` (compiled), always run through its training graph: under ``no_grad`` the positional arguments in
    ``grad_args`` (those that require grad in training) are detached copies that require grad, and the outputs
    come back detached. Costs the training graph's saved tensors until the call returns."""

    def call(*args: Any) -> Any:
        if torch.is_grad_enabled() or torch.is_inference_mode_enabled():  # inference tensors cannot require grad
            return fn(*args)
        with torch.enable_grad():
            out = fn(*(a.detach().requires_grad_() if i in grad_args else a for i, a in enumerate(args)))
        return tuple(t.detach() for t in out) if isinstance(out, tuple) else out.detach()

    return call


_compiled: dict[str, Any] = {}  # compiled on first use (compiling is lazy anyway; this keeps one of each)


def _fused(name: str) -> Any:
    if name not in _compiled:
        fn: Any = rms_norm if name == "rms_norm" else swiglu
        _compiled[name] = grad_mode_invariant(torch.compile(fn, dynamic=True), (0, 1))
    return _compiled[name]


def _norm_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = _fused("rms_norm")(x, self.weight, self.variance_epsilon)
    return out


def _mlp_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = self.down_proj(_fused("swiglu")(self.gate_proj(x), self.up_proj(x)))
    return out


def compile_layers(model: torch.nn.Module) -> dict[str, int]:
    """Fuse ``model``'s RMSNorms and SiLU-gated MLPs in place; returns how many of each were re-pointed."""
    counts = {"rms_norm": 0, "swiglu": 0}
    silu = getattr(model.config, "hidden_act", None) == "silu"
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm") and hasattr(module, "variance_epsilon") and hasattr(module, "weight"):
            module.forward = MethodType(_norm_forward, module)
            counts["rms_norm"] += 1
        elif silu and name.endswith("MLP") and all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj")):
            module.forward = MethodType(_mlp_forward, module)
            counts["swiglu"] += 1
    return counts
