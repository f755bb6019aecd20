"""One GEMM for q/k/v and one for gate/up per decoder layer, over the model's own parameters.

Each layer's ``q_proj``, ``k_proj`` and ``v_proj`` weights (and biases) are concatenated into one tensor and
the parameters are re-pointed at slices of it, and likewise ``gate_proj`` / ``up_proj``: the parameters still
exist under their names, so anything that copies new weights into them in place (every weight update:
:func:`agentrl.engine.weights.copy_weights`) writes into the packed tensors, and CUDA graphs that read those
see it. Code that *replaces* a parameter's storage (releasing weights in colocated mode) breaks the packing;
:meth:`PackedLayers.intact` tells, and the runner packs again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["PackedLayer", "PackedLayers", "packable"]


@dataclass
class PackedLayer:
    qkv_weight: torch.Tensor  # [q + 2 * kv, hidden]
    qkv_bias: torch.Tensor | None
    sizes: tuple[int, int, int]  # output features of q, k, v
    gate_up: torch.Tensor  # [2 * intermediate, hidden]: gate rows first


class PackedLayers:
    """The packed projections of every decoder layer (``layers[i]`` for layer ``i``)."""

    def __init__(self, decoder: Any) -> None:
        self.decoder = decoder
        self.layers = [_pack(layer) for layer in decoder.layers]

    def intact(self) -> bool:
        """Whether every parameter still lives in its packed tensor (nothing replaced a storage)."""
        return all(_intact(layer, packed) for layer, packed in zip(self.decoder.layers, self.layers, strict=True))


def packable(decoder: Any) -> bool:
    """Llama-family layers whose q/k/v all have biases or none do (Qwen2: all; Llama: none)."""
    for layer in decoder.layers:
        attn = layer.self_attn
        if len({p.bias is None for p in (attn.q_proj, attn.k_proj, attn.v_proj)}) != 1:
            return False
    return True


def _pack(layer: Any) -> PackedLayer:
    attn, mlp = layer.self_attn, layer.mlp
    projs = (attn.q_proj, attn.k_proj, attn.v_proj)
    weight = _pack_params([p.weight for p in projs])
    bias = None if attn.q_proj.bias is None else _pack_params([p.bias for p in projs])
    sizes = (projs[0].weight.shape[0], projs[1].weight.shape[0], projs[2].weight.shape[0])
    return PackedLayer(weight, bias, sizes, _pack_params([mlp.gate_proj.weight, mlp.up_proj.weight]))


@torch.no_grad()
def _pack_params(params: list[torch.nn.Parameter]) -> torch.Tensor:
    packed = torch.cat([p.data for p in params]).contiguous()
    start = 0
    for p in params:
        p.data = packed[start : start + p.shape[0]]
        start += p.shape[0]
    return packed


def _intact(layer: Any, packed: PackedLayer) -> bool:
    attn, mlp = layer.self_attn, layer.mlp
    pairs = [([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight], packed.qkv_weight),
             ([mlp.gate_proj.weight, mlp.up_proj.weight], packed.gate_up)]
    if packed.qkv_bias is not None:
        pairs.append(([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias], packed.qkv_bias))
    return all(_aliases(params, whole) for params, whole in pairs)


def _aliases(params: list[torch.Tensor], whole: torch.Tensor) -> bool:
    offset = 0
    for p in params:
        if p.data_ptr() != whole.data_ptr() + offset * whole.element_size() * whole.stride(0):
            return False
        offset += p.shape[0]
    return True
