"""Assemble an :class:`~agentrl.engine.server.EngineServer` from an :class:`EngineConfig`."""

from __future__ import annotations

import logging

import torch

from agentrl.config.engine import EngineConfig
from agentrl.engine.runner import ModelRunner
from agentrl.engine.scheduler import Scheduler
from agentrl.engine.server import EngineServer
from agentrl.engine.weights import eos_token_ids, load_model, resolve_device
from agentrl.errors import EngineError

__all__ = ["DEFAULT_CONTEXT", "build_server", "context_length_for"]

DEFAULT_CONTEXT = 4096

log = logging.getLogger(__name__)


def context_length_for(cfg: EngineConfig, model_max_positions: int | None) -> int:
    """``cfg.context_length`` if set, else ``min(model max positions, 4096)``; never above the model's maximum."""
    limit = model_max_positions or DEFAULT_CONTEXT
    length = cfg.context_length or min(limit, DEFAULT_CONTEXT)
    if length > limit:
        raise EngineError(f"context_length {length} exceeds the model's max_position_embeddings {limit}")
    return length


def build_server(cfg: EngineConfig, *, nats_url: str | None = None) -> EngineServer:
    """Load the model named by ``cfg.model`` and wire runner, scheduler and HTTP server (no I/O started)."""
    if not cfg.model:
        raise EngineError("engine.model is not set: pass --model PATH (a Hugging Face model directory)")
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    device, dtype = resolve_device(cfg.device, cfg.dtype)
    loaded = load_model(cfg.model, device, dtype)
    context = context_length_for(cfg, getattr(loaded.model.config, "max_position_embeddings", None))
    runner = ModelRunner(loaded.model, cfg.max_running + cfg.prefix_cache_slots, context)
    if device.type == "cuda" and cfg.cuda_graph:
        sizes = runner.capture_cuda_graphs(cfg.cuda_graph_batch_sizes)
        log.info("captured CUDA graphs for decode batch sizes %s", sizes)
    scheduler = Scheduler(
        runner,
        loaded.tokenizer,
        eos_token_ids(loaded),
        max_running=cfg.max_running,
        max_queued=cfg.max_queued,
        prefix_cache_slots=cfg.prefix_cache_slots,
        max_prefill_tokens=cfg.max_prefill_tokens,
        weight_version=cfg.weight_version,
    )
    return EngineServer(loaded, scheduler, cfg, context, nats_url=nats_url)
