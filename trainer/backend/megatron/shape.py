"""The architecture of a Qwen2 / Llama Hugging Face checkpoint, as the numbers Megatron needs.

:func:`shape_from_hf` reads a ``transformers`` config (``Qwen2Config``, ``LlamaConfig``, ...) and refuses,
with a :class:`~agentrl.errors.ConfigError` naming the field, anything this backend would get silently
wrong: other model types, RoPE scaling, biases on the output projection or the MLP, sliding windows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agentrl.errors import ConfigError

__all__ = ["SUPPORTED_MODEL_TYPES", "ModelShape", "shape_from_hf"]

SUPPORTED_MODEL_TYPES = ("qwen2", "llama")


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer with GQA, RoPE, RMSNorm and a SwiGLU MLP."""

    model_type: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    rope_theta: float
    norm_eps: float
    qkv_bias: bool
    tied: bool
    max_positions: int

    @property
    def heads_per_group(self) -> int:
        return self.heads // self.kv_heads

    def check_parallel(self, tp: int, pp: int) -> None:
        """Raise ConfigError unless heads, KV heads and layers split evenly over ``tp`` / ``pp`` ranks."""
        for name, value, parts in (("num_attention_heads", self.heads, tp), ("num_key_value_heads", self.kv_heads, tp),
                                   ("intermediate_size", self.ffn, tp), ("num_hidden_layers", self.layers, pp)):
            if value % parts:
                raise ConfigError(f"model {name}={value} does not split over {parts} "
                                  f"{'pipeline stages' if name == 'num_hidden_layers' else 'tensor-parallel ranks'}")


def _rope_theta(cfg: Any) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    scaling = getattr(cfg, "rope_scaling", None) or {}
    kind = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind not in ("default", None):
        raise ConfigError(f"model rope_type={kind!r}: only plain RoPE (rope_type default) is supported")
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
    if theta is None:
        raise ConfigError("model config has no rope_theta")
    return float(theta)


def _refuse(cfg: Any) -> None:
    if cfg.model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"model model_type={cfg.model_type!r}: the megatron backend supports {SUPPORTED_MODEL_TYPES}")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ConfigError(f"model hidden_act={cfg.hidden_act!r}: expected silu (SwiGLU)")
    if getattr(cfg, "mlp_bias", False):
        raise ConfigError("model mlp_bias=True: MLP biases are not supported")
    if cfg.model_type == "llama" and getattr(cfg, "attention_bias", False):
        raise ConfigError("model attention_bias=True: a biased output projection (o_proj) is not supported")
    if getattr(cfg, "use_sliding_window", False):
        raise ConfigError("model use_sliding_window=True: sliding-window attention is not supported")


def shape_from_hf(cfg: Any) -> ModelShape:
    """The :class:`ModelShape` of a ``transformers`` config object."""
    _refuse(cfg)
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    if heads % kv_heads:
        raise ConfigError(f"model num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    return ModelShape(
        model_type=cfg.model_type, layers=int(cfg.num_hidden_layers), hidden=int(cfg.hidden_size), heads=heads,
        kv_heads=kv_heads, head_dim=head_dim, ffn=int(cfg.intermediate_size), vocab=int(cfg.vocab_size),
        rope_theta=_rope_theta(cfg), norm_eps=float(cfg.rms_norm_eps),
        qkv_bias=cfg.model_type == "qwen2",
        tied=bool(getattr(cfg, "tie_word_embeddings", False)), max_positions=int(cfg.max_position_embeddings),
    )
