"""Assemble an :class:`~agentrl.engine.server.EngineServer` from an :class:`EngineConfig`."""

from __future__ import annotations

import logging
import os

import torch

from agentrl.config.engine import EngineConfig
from agentrl.engine.kv_cache import KVCache
from agentrl.engine.memory import MemoryManager
from agentrl.engine.runner import ModelRunner
from agentrl.engine.scheduler import Scheduler
from agentrl.engine.server import EngineServer
from agentrl.engine.weights import eos_token_ids, load_model, resolve_device
from agentrl.errors import EngineError

__all__ = ["DEFAULT_CONTEXT", "build_server", "context_length_for", "pool_tokens_for"]

DEFAULT_CONTEXT = 4096
CACHE_HEADROOM = 16  # default pool: room for max_running full-context sequences plus this many cached ones

log = logging.getLogger(__name__)


def context_length_for(cfg: EngineConfig, model_max_positions: int | None) -> int:
    """``cfg.context_length`` if set, else ``min(model max positions, 4096)``; never above the model's maximum."""
    limit = model_max_positions or DEFAULT_CONTEXT
    length = cfg.context_length or min(limit, DEFAULT_CONTEXT)
    if length > limit:
        raise EngineError(f"context_length {length} exceeds the model's max_position_embeddings {limit}")
    return length


def pool_tokens_for(cfg: EngineConfig, context: int) -> int:
    """KV pool positions: ``cfg.max_total_tokens`` or ``(max_running + 16) * context``; at least one context."""
    tokens = cfg.max_total_tokens or (cfg.max_running + CACHE_HEADROOM) * context
    if tokens < context:
        raise EngineError(f"engine.max_total_tokens {tokens} is below the context length {context}")
    return tokens


def _env_seconds(name: str) -> float | None:
    """SGLang's timeout variables: seconds, -1 (or unset) = off."""
    value = float(os.environ.get(name, "-1") or "-1")
    return value if value > 0 else None


def build_server(cfg: EngineConfig, *, nats_url: str | None = None) -> EngineServer:
    """Load the model named by ``cfg.model`` and wire runner, scheduler and HTTP server (no I/O started)."""
    if not cfg.model:
        raise EngineError("engine.model is not set: pass --model PATH (a Hugging Face model directory)")
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    device, dtype = resolve_device(cfg.device, cfg.dtype)
    loaded = load_model(cfg.model, device, dtype)
    context = context_length_for(cfg, getattr(loaded.model.config, "max_position_embeddings", None))
    pool = pool_tokens_for(cfg, context)
    kernel = None if cfg.decode_attention == "triton" else False  # None: the kernel where it runs (CUDA)
    runner = ModelRunner(loaded.model, cfg.max_running, context, pool, decode_kernel=kernel,
                         fused_ops=None if cfg.fused_ops else False, ragged_prefill=cfg.prefill == "ragged")
    sizes = None
    if device.type == "cuda" and cfg.cuda_graph:
        sizes = runner.capture_cuda_graphs(cfg.cuda_graph_batch_sizes)
        log.info("captured CUDA graphs for decode batch sizes %s", sizes)
    scheduler = Scheduler(
        runner,
        loaded.tokenizer,
        eos_token_ids(loaded),
        KVCache(pool, enabled=cfg.prefix_cache, version=cfg.weight_version),
        max_running=cfg.max_running,
        max_queued=cfg.max_queued,
        drain_for_weights=cfg.weight_update == "drain",
        overlap=cfg.overlap_schedule,
        fused_sampling=None if cfg.sampling == "triton" else False,
        max_prefill_tokens=cfg.max_prefill_tokens,
        weight_version=cfg.weight_version,
        waiting_timeout_s=cfg.waiting_timeout_s or _env_seconds("SGLANG_REQ_WAITING_TIMEOUT"),
        running_timeout_s=cfg.running_timeout_s or _env_seconds("SGLANG_REQ_RUNNING_TIMEOUT"),
        timeout_status=int(os.environ.get("SGLANG_TIMED_OUT_REQUEST_STATUS_CODE") or cfg.timeout_status_code),
    )
    log.info("KV pool: %d token positions (%.1f MiB), context %d", pool, runner.kv_bytes / 2**20, context)
    return EngineServer(loaded, scheduler, cfg, context, MemoryManager(runner, sizes), nats_url=nats_url)
