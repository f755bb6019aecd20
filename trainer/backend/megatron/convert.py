"""Hugging Face ↔ Megatron-core weights for Qwen2 / Llama, and their tensor/pipeline-parallel shards.

Three layouts:

- **HF**: ``model.layers.{i}.self_attn.q_proj.weight`` ... as ``transformers`` saves them.
- **global Megatron**: the names of a TP = PP = 1 ``GPTModel`` built with the local spec. Q, K and V are
  fused into ``linear_qkv`` grouped per KV head (for each query group: its query heads, then its key head,
  then its value head), and gate/up into ``linear_fc1`` (``[gate; up]``).
- **shard** (one rank): the part of the global layout a (TP rank, PP stage) holds, with stage-local layer
  numbers. Column-parallel weights (QKV, fc1, embedding and output rows) split along dim 0, row-parallel
  ones (attention output, fc2) along dim 1, norms are replicated. Because QKV is grouped per KV head, a
  contiguous dim-0 chunk is whole query groups; fc1 is split so each rank holds ``[gate_r; up_r]``. The
  vocabulary is padded with zero rows to a multiple of the TP size (those logits are excluded from the
  softmax by :mod:`trainer.vocab_logprobs`).

Every conversion only slices, concatenates and reshapes, so HF → shards → HF is bit-identical.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from trainer.backend.megatron.shape import ModelShape

__all__ = ["hf_to_megatron", "megatron_to_hf", "merge_shards", "padded_vocab", "shard", "stage_layers"]

Tensors = dict[str, torch.Tensor]

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# (megatron suffix, HF suffix) of weights that map one to one inside a layer
_LAYER_SAME = (
    ("input_layernorm.weight", "input_layernorm.weight"),
    ("pre_mlp_layernorm.weight", "post_attention_layernorm.weight"),
    ("self_attention.linear_proj.weight", "self_attn.o_proj.weight"),
    ("mlp.linear_fc2.weight", "mlp.down_proj.weight"),
)
_COLUMN = ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias")
_ROW = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")
_VOCAB = ("embedding.word_embeddings.weight", "output_layer.weight")


def padded_vocab(shape: ModelShape, tp: int) -> int:
    """The vocabulary rounded up to a multiple of ``tp`` (each TP rank holds an equal slice)."""
    return -(-shape.vocab // tp) * tp


def stage_layers(shape: ModelShape, pp: int, stage: int) -> range:
    """The global decoder-layer numbers held by pipeline stage ``stage`` of ``pp``."""
    per = shape.layers // pp
    return range(stage * per, (stage + 1) * per)


def _take(hf: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in hf:
        raise KeyError(f"Hugging Face checkpoint has no tensor {name!r}")
    return hf[name]


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: ModelShape) -> torch.Tensor:
    g = shape.kv_heads
    parts = [t.reshape(g, -1, *t.shape[1:]) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *q.shape[1:])


def _split_qkv(qkv: torch.Tensor, shape: ModelShape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d = shape.head_dim
    grouped = qkv.reshape(shape.kv_heads, (shape.heads_per_group + 2) * d, *qkv.shape[1:])
    q, k, v = grouped.split([shape.heads_per_group * d, d, d], dim=1)
    rest = qkv.shape[1:]
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def hf_to_megatron(hf: Mapping[str, torch.Tensor], shape: ModelShape) -> Tensors:
    """The global Megatron state dict of an HF state dict (Qwen2 / Llama names)."""
    out: Tensors = {"embedding.word_embeddings.weight": _take(hf, "model.embed_tokens.weight"),
                    "decoder.final_layernorm.weight": _take(hf, "model.norm.weight")}
    if not shape.tied:
        out["output_layer.weight"] = _take(hf, "lm_head.weight")
    for i in range(shape.layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        for mg, name in _LAYER_SAME:
            out[dst + mg] = _take(hf, src + name)
        attn = src + "self_attn."
        for kind in ("weight", "bias") if shape.qkv_bias else ("weight",):
            q, k, v = (_take(hf, f"{attn}{p}_proj.{kind}") for p in "qkv")
            out[f"{dst}self_attention.linear_qkv.{kind}"] = _fuse_qkv(q, k, v, shape)
        out[dst + "mlp.linear_fc1.weight"] = torch.cat(
            [_take(hf, src + "mlp.gate_proj.weight"), _take(hf, src + "mlp.up_proj.weight")])
    return out


def megatron_to_hf(mg: Mapping[str, torch.Tensor], shape: ModelShape) -> Tensors:
    """The HF state dict of a global Megatron state dict (inverse of :func:`hf_to_megatron`)."""
    out: Tensors = {"model.embed_tokens.weight": mg["embedding.word_embeddings.weight"],
                    "model.norm.weight": mg["decoder.final_layernorm.weight"]}
    if not shape.tied:
        out["lm_head.weight"] = mg["output_layer.weight"]
    for i in range(shape.layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        for m, name in _LAYER_SAME:
            out[dst + name] = mg[src + m]
        for kind in ("weight", "bias") if shape.qkv_bias else ("weight",):
            q, k, v = _split_qkv(mg[f"{src}self_attention.linear_qkv.{kind}"], shape)
            out.update({f"{dst}self_attn.q_proj.{kind}": q, f"{dst}self_attn.k_proj.{kind}": k,
                        f"{dst}self_attn.v_proj.{kind}": v})
        gate, up = mg[src + "mlp.linear_fc1.weight"].chunk(2)
        out[dst + "mlp.gate_proj.weight"], out[dst + "mlp.up_proj.weight"] = gate, up
    return {k: v.contiguous() for k, v in out.items()}


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t if t.shape[0] == rows else torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def _shard_tensor(suffix: str, t: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    if suffix == "mlp.linear_fc1.weight":
        gate, up = t.chunk(2)
        return torch.cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]])
    if suffix in _COLUMN or suffix in _VOCAB:
        return t.chunk(tp)[rank]
    if suffix in _ROW:
        return t.chunk(tp, dim=1)[rank]
    return t


def shard(mg: Mapping[str, torch.Tensor], shape: ModelShape, *, tp: int = 1, tp_rank: int = 0, pp: int = 1,
          pp_rank: int = 0) -> Tensors:
    """The state dict of the rank at ``(tp_rank, pp_rank)``, with stage-local layer numbers."""
    shape.check_parallel(tp, pp)
    first, last = pp_rank == 0, pp_rank == pp - 1
    layers = stage_layers(shape, pp, pp_rank)
    vocab = padded_vocab(shape, tp)
    out: Tensors = {}
    for name, t in mg.items():
        m = _LAYER.match(name)
        if m is not None:
            i = int(m.group(1))
            if i in layers:
                out[f"decoder.layers.{i - layers.start}.{m.group(2)}"] = _shard_tensor(m.group(2), t, tp, tp_rank)
        elif name in _VOCAB and (first if name.startswith("embedding") else last):
            out[name] = _shard_tensor(name, _pad_rows(t, vocab), tp, tp_rank)
        elif name == "decoder.final_layernorm.weight" and last:
            out[name] = t
    if shape.tied and last and pp > 1:  # the last stage keeps its own copy of the tied embedding
        out["output_layer.weight"] = _shard_tensor(_VOCAB[1], _pad_rows(mg[_VOCAB[0]], vocab), tp, tp_rank)
    return {k: v.contiguous() for k, v in out.items()}


def _merge_tensor(suffix: str, parts: list[torch.Tensor]) -> torch.Tensor:
    if suffix == "mlp.linear_fc1.weight":
        halves = [p.chunk(2) for p in parts]
        return torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])])
    if suffix in _COLUMN or suffix in _VOCAB:
        return torch.cat(parts)
    if suffix in _ROW:
        return torch.cat(parts, dim=1)
    return parts[0]


def merge_shards(shards: Mapping[tuple[int, int], Mapping[str, torch.Tensor]], shape: ModelShape, *, tp: int = 1,
                 pp: int = 1) -> Tensors:
    """The global Megatron state dict from every rank's shard, keyed by ``(pp_rank, tp_rank)``."""
    out: Tensors = {}
    for stage in range(pp):
        offset = stage_layers(shape, pp, stage).start
        ranks = [shards[(stage, r)] for r in range(tp)]
        for name in ranks[0]:
            if name == "output_layer.weight" and shape.tied:
                continue  # the last stage's copy of the embedding
            m = _LAYER.match(name)
            suffix = m.group(2) if m else name
            merged = _merge_tensor(suffix, [r[name] for r in ranks])
            key = f"decoder.layers.{int(m.group(1)) + offset}.{suffix}" if m else name
            out[key] = merged[: shape.vocab] if name in _VOCAB else merged
    return out
