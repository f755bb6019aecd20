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

import bisect
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from agentrl.errors import EngineError

__all__ = ["SUPPORTED_MODEL_TYPES", "ModelRunner", "Prefill"]

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama", "mistral")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Prefill(NamedTuple):
    """What a prefill returns: next-token logits per row, and prompt logprobs for the rows that asked."""

    logits: torch.Tensor
    prompt_logprobs: dict[int, torch.Tensor]


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
        self._graphs: _DecodeGraphs | None = None

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    @torch.inference_mode()
    def prefill(
        self,
        slots: Sequence[int],
        chunks: Sequence[Sequence[int]],
        starts: Sequence[int],
        *,
        score: Mapping[int, float] | None = None,
    ) -> Prefill:
        """Feed ``chunks[b]`` at positions ``starts[b]..`` of slot ``slots[b]``.

        Positions before ``starts[b]`` must already hold that sequence's keys/values (prefix reuse). Returns
        the float32 logits after each chunk's last token (``[len(slots), vocab]``) and, for each row ``b`` in
        ``score`` (row -> temperature), the logprobs ``log_softmax(logits / T)`` of ``chunks[b][1:]``.
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
        scores = {
            b: self._score(hidden[b, : len(chunks[b]) - 1], ids[b, 1 : len(chunks[b])], temperature)
            for b, temperature in (score or {}).items()
        }
        return Prefill(self._logits(hidden[rows, last]), scores)

    def _score(self, hidden: torch.Tensor, targets: torch.Tensor, temperature: float, chunk: int = 512) -> torch.Tensor:
        """Logprobs of ``targets`` under ``log_softmax(logits / T)``, ``chunk`` positions at a time (bounded memory)."""
        out = [
            torch.log_softmax(self._logits(hidden[i : i + chunk]) / temperature, dim=-1)
            .gather(-1, targets[i : i + chunk].view(-1, 1))
            .view(-1)
            for i in range(0, hidden.shape[0], chunk)
        ]
        return torch.cat(out).cpu() if out else torch.zeros(0)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int | None = None) -> torch.Tensor:
        """One token for each of rows ``0..n-1`` (slot = row) at ``positions``; padded rows use the scratch position.

        ``kv_len`` bounds the keys read (default: all; a captured CUDA graph always reads all). Returns
        ``[n, vocab]`` float32.
        """
        if self._graphs is not None and tokens.is_cuda:
            return self._graphs.run(tokens, positions)
        return self._decode_eager(tokens, positions, kv_len)

    def capture_cuda_graphs(self, batch_sizes: Sequence[int]) -> list[int]:
        """Capture decode steps for these batch sizes (plus the slot count); returns the sizes captured."""
        if self.device.type != "cuda":
            raise EngineError("CUDA graphs need a CUDA device")
        self._graphs = _DecodeGraphs(self, batch_sizes)
        return self._graphs.sizes

    def _decode_eager(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int | None) -> torch.Tensor:
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


class _DecodeGraphs:
    """Decode steps captured as CUDA graphs, one per batch size, sharing one memory pool and static inputs.

    A step of ``n`` rows replays the smallest captured size ``>= n``; extra rows are idle (scratch position).
    Weights are updated in place (:func:`agentrl.engine.weights.copy_weights`), so graphs stay valid.
    """

    def __init__(self, runner: ModelRunner, batch_sizes: Sequence[int]) -> None:
        self.runner = runner
        self.sizes = sorted({b for b in batch_sizes if 0 < b < runner.num_slots} | {runner.num_slots})
        top = self.sizes[-1]
        self.tokens = torch.zeros(top, dtype=torch.long, device=runner.device)
        self.positions = torch.full((top,), runner.scratch, dtype=torch.long, device=runner.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):
                runner._decode_eager(self.tokens, self.positions, None)
        torch.cuda.current_stream().wait_stream(stream)
        with torch.inference_mode():
            for b in reversed(self.sizes):  # largest first, so smaller graphs reuse its pool memory
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[b] = runner._decode_eager(self.tokens[:b], self.positions[:b], None)
                self.graphs[b] = graph
        torch.cuda.synchronize()

    def run(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[0]
        b = self.sizes[bisect.bisect_left(self.sizes, n)]
        self.tokens[:n].copy_(tokens)
        self.positions[:n].copy_(positions)
        self.positions[n:b].fill_(self.runner.scratch)
        self.graphs[b].replay()
        return self.outputs[b][:n]
