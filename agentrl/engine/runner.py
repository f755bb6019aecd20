"""Batched forward passes of a Hugging Face decoder over a KV cache allocated once.

The runner reuses the model's own modules (embedding, norms, projections, rotary embedding, MLP, LM head),
so loading new weights into the HF model is enough to change what the runner computes. Attention is
recomputed here against a static cache of shape ``[layers][slots, kv_heads, context + 1, head_dim]``:

- a *slot* holds one sequence's keys and values; the scheduler owns slot assignment;
- position ``context`` (the last one) is scratch: padded decode rows write there and nothing reads it;
- a decode step runs over rows ``0..n-1`` (= slots), so the cache is read as a view without gathers and
  the step has static shapes when ``n`` is one of a few bucket sizes (what CUDA graphs need).

Supported: llama-family decoders (Qwen2, Qwen3, Llama, Mistral without sliding window).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from agentrl.errors import EngineError

__all__ = ["SUPPORTED_MODEL_TYPES", "ModelRunner"]

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama", "mistral")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class ModelRunner:
    """Prefill and decode for many sequences at once; returns float32 next-token logits."""

    def __init__(self, model: Any, num_slots: int, context_length: int) -> None:
        cfg = model.config
        if cfg.model_type not in SUPPORTED_MODEL_TYPES:
            raise EngineError(
                f"model_type {cfg.model_type!r} is not supported by the embedded engine "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        if getattr(cfg, "use_sliding_window", False):
            raise EngineError("models with use_sliding_window=true are not supported by the embedded engine")
        self.model = model
        self.decoder = model.model
        self.num_slots = num_slots
        self.context_length = context_length
        self.scratch = context_length  # the extra, never-read position
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        shape = (num_slots, self.num_kv_heads, context_length + 1, self.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.decoder.layers]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.decoder.layers]

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    @torch.inference_mode()
    def prefill(self, slots: Sequence[int], chunks: Sequence[Sequence[int]], starts: Sequence[int]) -> torch.Tensor:
        """Feed ``chunks[b]`` at positions ``starts[b]..`` of slot ``slots[b]``; logits after each chunk's last token.

        Positions before ``starts[b]`` must already hold that sequence's keys/values (prefix reuse).
        Returns ``[len(slots), vocab]`` float32.
        """
        width = max(len(c) for c in chunks)
        ids = torch.zeros((len(chunks), width), dtype=torch.long)
        pos = torch.full((len(chunks), width), self.scratch, dtype=torch.long)
        for b, (chunk, start) in enumerate(zip(chunks, starts, strict=True)):
            ids[b, : len(chunk)] = torch.as_tensor(list(chunk), dtype=torch.long)
            pos[b, : len(chunk)] = torch.arange(start, start + len(chunk))
        last = torch.tensor([len(c) - 1 for c in chunks], dtype=torch.long)
        ids, pos, last = ids.to(self.device), pos.to(self.device), last.to(self.device)
        slot_t = torch.as_tensor(list(slots), dtype=torch.long, device=self.device)
        kv_len = max(s + len(c) for s, c in zip(starts, chunks, strict=True))
        hidden = self._forward(ids, pos, slot_t, kv_len, gather=True)
        rows = torch.arange(len(chunks), device=self.device)
        return self._logits(hidden[rows, last])

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int | None = None) -> torch.Tensor:
        """One token for each of rows ``0..n-1`` (slot = row) at ``positions``; padded rows use the scratch position.

        ``kv_len`` bounds the keys read (default: all); returns ``[n, vocab]`` float32.
        """
        n = tokens.shape[0]
        rows = torch.arange(n, device=self.device)
        hidden = self._forward(tokens.view(n, 1), positions.view(n, 1), rows, kv_len or self.scratch + 1, gather=False)
        return self._logits(hidden[:, 0])

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.decoder.norm(hidden)).float()

    def _forward(
        self, ids: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, kv_len: int, *, gather: bool
    ) -> torch.Tensor:
        hidden = self.decoder.embed_tokens(ids)
        cos, sin = self.decoder.rotary_emb(hidden, pos)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        keys = torch.arange(kv_len, device=self.device)
        mask = (keys.view(1, 1, -1) <= pos.unsqueeze(-1)).unsqueeze(1)  # [B, 1, Q, kv_len]
        for i, layer in enumerate(self.decoder.layers):
            residual = hidden
            attn_in = layer.input_layernorm(hidden)
            hidden = residual + self._attention(i, layer.self_attn, attn_in, cos, sin, pos, slots, mask, gather)
            residual = hidden
            hidden = residual + layer.mlp(layer.post_attention_layernorm(hidden))
        return hidden

    def _attention(
        self,
        i: int,
        attn: Any,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        pos: torch.Tensor,
        slots: torch.Tensor,
        mask: torch.Tensor,
        gather: bool,
    ) -> torch.Tensor:
        b, q_len, _ = x.shape
        q = attn.q_proj(x).view(b, q_len, -1, self.head_dim)
        k = attn.k_proj(x).view(b, q_len, -1, self.head_dim)
        v = attn.v_proj(x).view(b, q_len, -1, self.head_dim)
        if getattr(attn, "q_norm", None) is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        kc, vc = self.k_cache[i], self.v_cache[i]
        kc[slots.view(-1, 1), :, pos] = k.transpose(1, 2)
        vc[slots.view(-1, 1), :, pos] = v.transpose(1, 2)
        kv_len = mask.shape[-1]
        if gather:
            keys, values = kc[slots, :, :kv_len], vc[slots, :, :kv_len]
        else:
            keys, values = kc[:b, :, :kv_len], vc[:b, :, :kv_len]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scaling, enable_gqa=True)
        return attn.o_proj(out.transpose(1, 2).reshape(b, q_len, -1))
