"""Batched forward passes of a Hugging Face decoder over a paged KV pool allocated once.

The runner reuses the model's own modules (embedding, norms, projections, rotary embedding, MLP, LM head),
so loading new weights into the HF model is enough to change what the runner computes. Attention is
recomputed here against a pool of keys/values shaped ``[layers, 2, pool_tokens + 1, kv_heads, head_dim]``:

- a *row* is one running sequence; ``table[row, p]`` is the pool index holding its position ``p`` (the
  scheduler fills rows from :class:`~agentrl.engine.kv_cache.KVSeq`, so rows can share prefix positions);
- pool index ``pool_tokens`` (the last) and position ``context`` are scratch: padded rows and positions write
  there and nothing valid reads them;
- a decode step runs over rows ``0..n-1``, so it has static shapes when ``n`` is one of a few bucket sizes
  (what CUDA graphs need; a captured step reads the whole table, indices included);
- on CUDA a decode step's attention is :func:`~agentrl.engine.decode_attention.paged_decode_attention`, which
  reads only each row's own keys (its length comes from its position, on the device); decode steps on CPU
  gather the keys up to ``kv_len`` and run masked SDPA (:func:`gathered_sdpa`);
- a prefill packs its chunks into one row and gathers each sequence's own keys for
  :func:`~agentrl.engine.ragged.ragged_attention` (``ragged_prefill``, the default), or pads them to the longest
  and runs :func:`gathered_sdpa`.

Supported: llama-family decoders (Qwen2, Qwen3, Llama, Mistral without sliding window).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from agentrl.engine.packed import PackedLayer, PackedLayers, packable
from agentrl.engine.ragged import ragged_attention
from agentrl.engine.triton_mode import interpreted
from agentrl.errors import EngineError

__all__ = ["SUPPORTED_MODEL_TYPES", "ModelRunner", "Prefill", "PromptScores", "ScoreSpec", "gathered_sdpa"]

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama", "mistral")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def gathered_sdpa(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, read: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Attention of ``q [B, H, Q, D]`` over the keys at pool indices ``read [B, kv_len]`` where ``mask`` allows."""
    keys, values = k_pool[read].transpose(1, 2), v_pool[read].transpose(1, 2)  # [B, kv_heads, kv_len, D]
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)


def _use_triton(device: torch.device, wanted: bool | None, what: str) -> bool:
    """Whether a Triton path is to be used (default: on CUDA); on CPU only under Triton's interpreter."""
    if not (device.type == "cuda" if wanted is None else wanted):
        return False
    if device.type != "cuda" and not interpreted():
        raise EngineError(f"{what} on a CPU device needs TRITON_INTERPRET=1 (Triton's interpreter)")
    return True


def _decode_kernel(device: torch.device, wanted: bool | None) -> Callable[..., torch.Tensor] | None:
    """The decode-attention kernel if it is to be used (default: on CUDA), else None."""
    if not _use_triton(device, wanted, "decode_kernel"):
        return None
    from agentrl.engine.decode_attention import paged_decode_attention  # imports triton: only when used

    return paged_decode_attention


def _fused_ops(device: torch.device, wanted: bool | None) -> Any:
    """The fused layer ops module (:mod:`agentrl.engine.fused_ops`) if they are to be used, else None."""
    if not _use_triton(device, wanted, "fused_ops"):
        return None
    from agentrl.engine import fused_ops  # imports triton: only when used

    return fused_ops


def _qkv(attn: Any, x: torch.Tensor, proj: PackedLayer | None, head_dim: int) -> tuple[torch.Tensor, ...]:
    """q, k, v as ``[B, Q, heads, head_dim]`` (views of one GEMM's output when the layer is packed)."""
    b, q_len, _ = x.shape
    if proj is None:
        outs: tuple[torch.Tensor, ...] = (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x))
    else:
        outs = F.linear(x, proj.qkv_weight, proj.qkv_bias).split(proj.sizes, dim=-1)
    return tuple(t.view(b, q_len, -1, head_dim) for t in outs)


def _mlp(mlp: Any, x: torch.Tensor, proj: PackedLayer | None, ops: Any) -> torch.Tensor:
    """``down(act(gate(x)) * up(x))``: one GEMM for gate and up when packed, SiLU-and-mul fused with ``ops``."""
    if proj is None:
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        return mlp.down_proj(ops.silu_mul(gate, up) if ops is not None else mlp.act_fn(gate) * up)
    gate_up = F.linear(x, proj.gate_up)
    if ops is not None:
        return mlp.down_proj(ops.silu_mul(gate_up))
    gate, up = gate_up.chunk(2, dim=-1)
    return mlp.down_proj(mlp.act_fn(gate) * up)


class _Keys(NamedTuple):
    """Where a forward pass writes its new keys/values, and which keys each query reads (one of two ways)."""

    where: torch.Tensor  # [B, Q] pool index of each new token
    read: torch.Tensor | None = None  # SDPA: [B, kv_len] pool index of each key position
    mask: torch.Tensor | None = None  # SDPA: [B, 1, Q, kv_len] key allowed
    table: torch.Tensor | None = None  # decode kernel: [B, context + 1] the rows' tables
    lens: torch.Tensor | None = None  # decode kernel: [B] int32 keys of each row (0: idle row)
    ragged: Ragged | None = None  # ragged prefill (B = 1, one packed row): ``read`` is [keys] of all sequences


class Ragged(NamedTuple):
    """A ragged prefill's sequences: query and key counts, and their cumulative sums on the device."""

    q_lens: list[int]
    k_lens: list[int]
    cu_q: torch.Tensor  # int32 [n + 1]
    cu_k: torch.Tensor  # int32 [n + 1]


class ScoreSpec(NamedTuple):
    """What to compute for the prompt positions of one prefill row (see :meth:`ModelRunner.prefill`)."""

    temperature: float
    top_k: int = 0  # top-k logprobs per position (0: none)
    token_ids: tuple[int, ...] = ()  # logprobs of these token ids at every position


class PromptScores(NamedTuple):
    """Per scored position: logprob of the next prompt token, and optionally top-k and chosen ids' logprobs (CPU)."""

    logprobs: torch.Tensor  # [n]
    top_values: torch.Tensor | None = None  # [n, k]
    top_ids: torch.Tensor | None = None  # [n, k]
    ids_logprobs: torch.Tensor | None = None  # [n, len(token_ids)]


class Prefill(NamedTuple):
    """What a prefill returns: next-token logits per row, and prompt scores for the rows that asked."""

    logits: torch.Tensor
    prompt_logprobs: dict[int, PromptScores]


class ModelRunner:
    """Prefill and decode for many sequences at once; returns float32 next-token logits."""

    def __init__(
        self, model: Any, num_rows: int, context_length: int, pool_tokens: int, *, decode_kernel: bool | None = None,
        fused_ops: bool | None = None, ragged_prefill: bool = True,
    ) -> None:
        """``decode_kernel``: decode attention by the Triton kernel; ``fused_ops``: residual add + RMSNorm, SiLU-and-mul
        and rotary + KV store by Triton kernels (:mod:`agentrl.engine.fused_ops`) instead of the HF modules. Both
        default to on CUDA; True on CPU only under ``TRITON_INTERPRET=1`` (the interpreter, for tests).
        ``ragged_prefill``: a prefill packs its chunks into one row (:meth:`_prefill_ragged`) instead of padding
        each to the longest and masking."""
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
        self.num_rows = num_rows
        self.context_length = context_length
        self.pool_tokens = pool_tokens
        self.scratch = context_length  # the extra, never-read position
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self._kernel = _decode_kernel(self.device, decode_kernel)
        self.decode_kernel = self._kernel is not None
        self._ops = _fused_ops(self.device, fused_ops)
        self.fused_ops = self._ops is not None
        self.ragged_prefill = ragged_prefill
        self._packable = packable(self.decoder)
        self._packed: PackedLayers | None = None
        self.kv: torch.Tensor | None = None
        self.allocate_kv()
        self.table = torch.full((num_rows, context_length + 1), pool_tokens, dtype=torch.long, device=self.device)
        self._graphs: _DecodeGraphs | None = None

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    @property
    def kv_bytes(self) -> int:
        """Bytes of the KV pool (0 while released)."""
        return 0 if self.kv is None else self.kv.numel() * self.kv.element_size()

    def allocate_kv(self) -> None:
        """(Re)allocate the zeroed KV pool, one tensor (large enough that freeing it returns it to the OS)."""
        shape = (len(self.decoder.layers), 2, self.pool_tokens + 1, self.num_kv_heads, self.head_dim)
        self.kv = torch.zeros(shape, dtype=self.dtype, device=self.device)

    def release_kv(self) -> None:
        """Free the KV pool (and the CUDA graphs that read it); :meth:`allocate_kv` brings it back."""
        self._graphs = None
        self.kv = None

    def set_rows(self, rows: Sequence[int], indices: Sequence[Any]) -> None:
        """Point ``table[row, :len(idx)]`` at pool indices ``idx`` (numpy int64 arrays) for each row."""
        for row, idx in zip(rows, indices, strict=True):
            self.table[row, : len(idx)] = torch.from_numpy(idx).to(self.device, non_blocking=True)

    @torch.inference_mode()
    def prefill(
        self,
        rows: Sequence[int],
        chunks: Sequence[Sequence[int]],
        starts: Sequence[int],
        *,
        score: Mapping[int, ScoreSpec] | None = None,
    ) -> Prefill:
        """Feed ``chunks[b]`` at positions ``starts[b]..`` of row ``rows[b]``.

        Positions before ``starts[b]`` must already hold that sequence's keys/values (prefix reuse). Returns
        the float32 logits after each chunk's last token (``[len(rows), vocab]``) and, for each row ``b`` in
        ``score``, the scores (:class:`PromptScores`) of ``chunks[b][1:]`` under ``log_softmax(logits / T)``.
        """
        if self.ragged_prefill and not self._nothing_to_unpad(chunks, starts):
            return self._prefill_ragged(rows, chunks, starts, score or {})
        width = max(len(c) for c in chunks)
        ids = torch.zeros((len(chunks), width), dtype=torch.long)
        pos = torch.full((len(chunks), width), self.scratch, dtype=torch.long)
        for b, (chunk, start) in enumerate(zip(chunks, starts, strict=True)):
            ids[b, : len(chunk)] = torch.as_tensor(list(chunk), dtype=torch.long)
            pos[b, : len(chunk)] = torch.arange(start, start + len(chunk))
        last = torch.tensor([len(c) - 1 for c in chunks], dtype=torch.long)
        ids, pos, last = ids.to(self.device), pos.to(self.device), last.to(self.device)
        row_t = torch.as_tensor(list(rows), dtype=torch.long, device=self.device)
        kv_len = max(s + len(c) for s, c in zip(starts, chunks, strict=True))
        hidden = self._forward(ids, pos, self._keys(pos, row_t, kv_len))
        batch = torch.arange(len(chunks), device=self.device)
        scores = {
            b: self.score(hidden[b, : len(chunks[b]) - 1], ids[b, 1 : len(chunks[b])], spec)
            for b, spec in (score or {}).items()
        }
        return Prefill(self._logits(hidden[batch, last]), scores)

    def _nothing_to_unpad(self, chunks: Sequence[Sequence[int]], starts: Sequence[int]) -> bool:
        """Off CUDA, fresh prompts of one length run padded: nothing is padded there, so packing saves nothing, and
        one SDPA call serves the batch instead of one per prompt (on CUDA one flash varlen launch does either)."""
        return (self.device.type != "cuda" and not any(starts)
                and len({len(c) for c in chunks}) == 1)

    def _prefill_ragged(self, rows: Sequence[int], chunks: Sequence[Sequence[int]], starts: Sequence[int],
                        score: Mapping[int, ScoreSpec]) -> Prefill:
        """:meth:`prefill` with every chunk's tokens in one packed row: no padding to the longest chunk, and each
        chunk's queries attend only to its own sequence's keys (``ragged_attention``)."""
        q_lens = [len(c) for c in chunks]
        k_lens = [s + n for s, n in zip(starts, q_lens, strict=True)]
        pos = np.concatenate([np.arange(s, k) for s, k in zip(starts, k_lens, strict=True)])
        key_pos = np.concatenate([np.arange(k) for k in k_lens])
        cu = np.zeros((2, len(chunks) + 1), dtype=np.int32)
        np.cumsum(q_lens, out=cu[0, 1:])
        np.cumsum(k_lens, out=cu[1, 1:])
        host = {"ids": torch.as_tensor(np.fromiter(itertools.chain.from_iterable(chunks), np.int64, sum(q_lens))),
                "pos": torch.from_numpy(pos), "q_rows": torch.from_numpy(np.repeat(np.asarray(rows), q_lens)),
                "key_pos": torch.from_numpy(key_pos), "k_rows": torch.from_numpy(np.repeat(np.asarray(rows), k_lens)),
                "cu": torch.from_numpy(cu)}
        dev = {name: t.to(self.device, non_blocking=True) for name, t in host.items()}
        ids, pos_t = dev["ids"].view(1, -1), dev["pos"].view(1, -1)
        keys = _Keys(self.table[dev["q_rows"], dev["pos"]].view(1, -1), read=self.table[dev["k_rows"], dev["key_pos"]],
                     ragged=Ragged(q_lens, k_lens, dev["cu"][0], dev["cu"][1]))
        hidden = self._forward(ids, pos_t, keys)[0]  # [tokens, hidden]
        first = cu[0, :-1].tolist()
        scores = {b: self.score(hidden[first[b] : first[b] + q_lens[b] - 1], ids[0, first[b] + 1 : first[b] + q_lens[b]],
                                spec) for b, spec in score.items()}
        last = dev["cu"][0, 1:].long() - 1
        return Prefill(self._logits(hidden[last]), scores)

    def score(self, hidden: torch.Tensor, targets: torch.Tensor, spec: ScoreSpec, chunk: int = 512) -> PromptScores:
        """Scores of ``targets`` under ``log_softmax(logits / T)``, ``chunk`` positions at a time (bounded memory)."""
        ids = torch.tensor(spec.token_ids, dtype=torch.long, device=self.device)
        cols: list[list[torch.Tensor]] = [[], [], [], []]
        for i in range(0, max(hidden.shape[0], 1), chunk):  # an empty slice still yields correctly shaped outputs
            logp = torch.log_softmax(self._logits(hidden[i : i + chunk]) / spec.temperature, dim=-1)
            cols[0].append(logp.gather(-1, targets[i : i + chunk].view(-1, 1)).view(-1).cpu())
            if spec.top_k:
                top = logp.topk(spec.top_k, dim=-1)
                cols[1].append(top.values.cpu())
                cols[2].append(top.indices.cpu())
            if spec.token_ids:
                cols[3].append(logp[:, ids].cpu())
        out = [torch.cat(c) if c else None for c in cols]
        assert out[0] is not None
        return PromptScores(out[0], out[1], out[2], out[3])

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int | None = None) -> torch.Tensor:
        """One token for each of rows ``0..n-1`` at ``positions``; padded rows use the scratch position.

        ``kv_len`` bounds the keys read (default: all; a captured CUDA graph always reads all). Returns
        ``[n, vocab]`` float32.
        """
        if self._graphs is not None and tokens.is_cuda:
            return self._graphs.run(tokens, positions)
        return self._decode_eager(tokens, positions, kv_len)

    def capture_cuda_graphs(self, batch_sizes: Sequence[int]) -> list[int]:
        """Capture decode steps for these batch sizes (plus the row count); returns the sizes captured."""
        if self.device.type != "cuda":
            raise EngineError("CUDA graphs need a CUDA device")
        self._graphs = _DecodeGraphs(self, batch_sizes)
        return self._graphs.sizes

    def drop_cuda_graphs(self) -> None:
        self._graphs = None

    @property
    def has_cuda_graphs(self) -> bool:
        return self._graphs is not None

    def _decode_eager(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int | None) -> torch.Tensor:
        n = tokens.shape[0]
        rows = torch.arange(n, device=self.device)
        pos = positions.view(n, 1)
        hidden = self._forward(tokens.view(n, 1), pos, self._keys(pos, rows, kv_len or self.scratch + 1))
        return self._logits(hidden[:, 0])

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        norm = self.decoder.norm
        if self._ops is not None:
            return self.model.lm_head(self._ops.fused_add_rmsnorm(hidden, None, norm.weight, norm.variance_epsilon)[0]).float()
        return self.model.lm_head(norm(hidden)).float()

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, keys: _Keys) -> torch.Tensor:
        if self.kv is None:
            raise EngineError("the KV cache is released (resume_memory_occupation first)")
        hidden = self.decoder.embed_tokens(ids)
        cos, sin = self.decoder.rotary_emb(hidden, pos)  # [B, Q, head_dim]
        packed = self._packed_layers()
        if self._ops is not None:
            return self._fused_layers(hidden, cos, sin, keys, packed)
        for i, layer in enumerate(self.decoder.layers):
            residual = hidden
            attn_in = layer.input_layernorm(hidden)
            hidden = residual + self._attention(self.kv[i], layer.self_attn, attn_in, cos, sin, keys, packed[i])
            residual = hidden
            hidden = residual + _mlp(layer.mlp, layer.post_attention_layernorm(hidden), packed[i], None)
        return hidden

    def _packed_layers(self) -> list[PackedLayer | None]:
        """Each layer's packed projections, packing (again) where a parameter's storage was replaced."""
        if not self._packable:
            return [None] * len(self.decoder.layers)
        if self._packed is None or not self._packed.intact():
            if self._graphs is not None:  # they read the old tensors
                self._graphs = None
            self._packed = PackedLayers(self.decoder)
        return list(self._packed.layers)

    def drop_packed(self) -> None:
        """Forget the packed tensors (the weights were released; the next forward packs the new ones)."""
        self._packed = None

    def _fused_layers(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: _Keys, packed: list[PackedLayer | None]
    ) -> torch.Tensor:
        """The decoder layers with the residual adds fused into the norms and SiLU-and-mul fused (weights and
        epsilons read from the HF modules at each call, so in-place weight updates reach captured graphs too)."""
        ops, kv, x = self._ops, self.kv, hidden
        residual: torch.Tensor | None = None
        assert kv is not None
        for i, layer in enumerate(self.decoder.layers):
            norm1, norm2, mlp = layer.input_layernorm, layer.post_attention_layernorm, layer.mlp
            x, residual = ops.fused_add_rmsnorm(x, residual, norm1.weight, norm1.variance_epsilon)
            x = self._attention(kv[i], layer.self_attn, x, cos, sin, keys, packed[i])
            x, residual = ops.fused_add_rmsnorm(x, residual, norm2.weight, norm2.variance_epsilon)
            x = _mlp(mlp, x, packed[i], ops)
        return x if residual is None else residual + x

    def _keys(self, pos: torch.Tensor, rows: torch.Tensor, kv_len: int) -> _Keys:
        table = self.table[rows]
        where = table.gather(1, pos)
        if self._kernel is not None and pos.shape[1] == 1:  # one new token per row: only its own keys are read
            lens = torch.where(pos[:, 0] == self.scratch, 0, pos[:, 0] + 1).to(torch.int32)
            return _Keys(where, table=table, lens=lens)
        keys = torch.arange(kv_len, device=self.device)
        mask = (keys.view(1, 1, -1) <= pos.unsqueeze(-1)).unsqueeze(1)
        return _Keys(where, read=table[:, :kv_len], mask=mask)

    def _attention(
        self, kv: torch.Tensor, attn: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: _Keys,
        proj: PackedLayer | None,
    ) -> torch.Tensor:
        b, q_len, _ = x.shape
        q, k, v = _qkv(attn, x, proj, self.head_dim)
        if getattr(attn, "q_norm", None) is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        if self._ops is not None:  # rotary on q in place; rotated keys and the values go straight into the pool
            d, flat = self.head_dim, b * q_len
            q = self._ops.rotary_qk_to_pool(q.reshape(flat, -1, d), k.reshape(flat, -1, d), v.reshape(flat, -1, d),
                                            cos.reshape(flat, d), sin.reshape(flat, d), kv, keys.where.reshape(-1))
            q = q.view(b, q_len, -1, d).transpose(1, 2)
        else:
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            kv[0][keys.where] = k.transpose(1, 2)
            kv[1][keys.where] = v
        if self._kernel is not None and keys.lens is not None:
            out = self._kernel(q[:, :, 0], kv[0], kv[1], keys.table, keys.lens, attn.scaling).unsqueeze(2)
        elif keys.ragged is not None:
            assert keys.read is not None
            r = keys.ragged
            out = ragged_attention(q[0].transpose(0, 1).contiguous(), kv[0][keys.read], kv[1][keys.read], r.cu_q,
                                   r.cu_k, r.q_lens, r.k_lens, attn.scaling).transpose(0, 1).unsqueeze(0)
        else:
            assert keys.read is not None and keys.mask is not None
            out = gathered_sdpa(q, kv[0], kv[1], keys.read, keys.mask, attn.scaling)
        return attn.o_proj(out.transpose(1, 2).reshape(b, q_len, -1))


class _DecodeGraphs:
    """Decode steps captured as CUDA graphs, one per batch size, sharing one memory pool and static inputs.

    A step of ``n`` rows replays the smallest captured size ``>= n``; extra rows are idle (scratch position).
    Weights are updated in place (:func:`agentrl.engine.weights.copy_weights`), so graphs stay valid.
    """

    def __init__(self, runner: ModelRunner, batch_sizes: Sequence[int]) -> None:
        self.runner = runner
        self.sizes = sorted({b for b in batch_sizes if 0 < b < runner.num_rows} | {runner.num_rows})
        top = self.sizes[-1]
        self.tokens = torch.zeros(top, dtype=torch.long, device=runner.device)
        self.positions = torch.full((top,), runner.scratch, dtype=torch.long, device=runner.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            runner._decode_eager(self.tokens, self.positions, None)
            for b in reversed(self.sizes):  # every size once, so no kernel is compiled while capturing
                runner._decode_eager(self.tokens[:b], self.positions[:b], None)
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
