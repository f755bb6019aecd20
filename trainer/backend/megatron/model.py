"""Build a megatron-core ``GPTModel`` (local spec, our packed attention) for a :class:`ModelShape`.

The layer spec is megatron-core's local one (no Transformer Engine) with RMSNorm, with its core attention
replaced through the ModuleSpec system by :class:`~trainer.backend.megatron.attention.VarlenAttention`,
which also applies RoPE (the model itself has ``position_embedding_type="none"``). Parallel state must be
initialised first (:mod:`trainer.backend.megatron.parallel`); the model is this rank's pipeline stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from trainer.backend.megatron._mcore import require
from trainer.backend.megatron.attention import VarlenAttention
from trainer.backend.megatron.convert import padded_vocab
from trainer.backend.megatron.shape import ModelShape

__all__ = ["ModelOptions", "RMSNorm", "build_gpt", "layer_spec", "transformer_config"]


class RMSNorm(torch.nn.RMSNorm):
    """RMSNorm for the local spec, also under sequence parallelism (megatron's own torch norm refuses it).

    With sequence parallelism each TP rank normalises its own tokens, so the weight's gradient is partial;
    marking the weight ``sequence_parallel`` makes megatron's grad finalisation sum it over the TP group.
    """

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-6, **_: Any) -> None:
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)  # noqa: B010  (read by megatron)


@dataclass(frozen=True)
class ModelOptions:
    """How to build the model besides its architecture."""

    tp: int = 1
    pp: int = 1
    sequence_parallel: bool = False
    bf16: bool = False
    kernel: str = "sdpa"  # VarlenAttention kernel: varlen | sdpa
    fused_rope: bool = False  # VarlenAttention applies RoPE through torch.compile (GPU)
    fused_swiglu: bool = False  # megatron-core's fused SwiGLU (torch.compile; saves only its input for backward)
    recompute: bool = False  # full activation recomputation of every layer
    cpu: bool = True  # parameters created on the CPU (no CUDA)


def transformer_config(shape: ModelShape, opts: ModelOptions) -> Any:
    """The ``TransformerConfig`` of ``shape`` (fusions that need Apex / TE off, SwiGLU's as asked; per-token loss
    scaling)."""
    require()
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = torch.bfloat16 if opts.bf16 else torch.float32
    recompute = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1} \
        if opts.recompute else {}
    return TransformerConfig(
        num_layers=shape.layers, hidden_size=shape.hidden, num_attention_heads=shape.heads,
        num_query_groups=shape.kv_heads, kv_channels=shape.head_dim, ffn_hidden_size=shape.ffn,
        normalization="RMSNorm", layernorm_epsilon=shape.norm_eps, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, add_qkv_bias=shape.qkv_bias, hidden_dropout=0.0,
        attention_dropout=0.0, bf16=opts.bf16, params_dtype=dtype, pipeline_dtype=dtype,
        tensor_model_parallel_size=opts.tp, pipeline_model_parallel_size=opts.pp,
        sequence_parallel=opts.sequence_parallel and opts.tp > 1, use_cpu_initialization=opts.cpu,
        perform_initialization=False, bias_dropout_fusion=False, bias_activation_fusion=opts.fused_swiglu,
        masked_softmax_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False,
        apply_rope_fusion=False, calculate_per_token_loss=True, variable_seq_lengths=True,
        moe_token_dispatcher_type="alltoall", **recompute,  # (no MoE; the default dispatcher refuses variable lengths)
    )


def layer_spec(kernel: str, fused_rope: bool = False) -> Any:
    """megatron-core's local GPT layer spec with RMSNorm and :class:`VarlenAttention` as core attention."""
    require()
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec

    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = RMSNorm
    attention = spec.submodules.self_attention.submodules
    attention.core_attention = ModuleSpec(module=VarlenAttention, params={"kernel": kernel, "fused_rope": fused_rope})
    return spec


def build_gpt(shape: ModelShape, opts: ModelOptions, *, pre_process: bool, post_process: bool) -> Any:
    """This rank's stage of the ``GPTModel`` (uninitialised weights: load a shard into it)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    shape.check_parallel(opts.tp, opts.pp)
    block = TransformerBlockSubmodules(layer_specs=[layer_spec(opts.kernel, opts.fused_rope)] * (shape.layers // opts.pp),
                                       layer_norm=RMSNorm)
    return GPTModel(
        transformer_config(shape, opts), block, vocab_size=padded_vocab(shape, opts.tp),
        max_sequence_length=shape.max_positions, pre_process=pre_process, post_process=post_process,
        parallel_output=True, share_embeddings_and_output_weights=shape.tied, position_embedding_type="none",
    )
