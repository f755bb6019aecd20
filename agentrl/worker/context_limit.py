"""How long an episode may grow: the model's own context length, asked from the engines that serve it.

An episode longer than the engine's context length is refused by the engine (a 400); with the budget known,
the episode ends ``truncated`` first, a policy outcome. The limit comes from each engine's
``/get_model_info`` (``context_length``, which the embedded engine reports) or OpenAI's ``/v1/models``
(``max_model_len``, which SGLang reports), the smallest over all engines; when no engine says, from the model's
``config.json`` (``max_position_embeddings``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from agentrl.errors import AgentRLError

__all__ = ["context_from_info", "context_from_model_dir", "episode_budget", "model_context_length"]

log = logging.getLogger(__name__)


class InfoSource(Protocol):
    async def request(self, method: str, path: str, body: Any = None, *, timeout: float | None = None) -> Any: ...


def context_from_info(info: Any) -> int | None:
    """``context_length`` (``/get_model_info``) or the first model's ``max_model_len`` (``/v1/models``)."""
    if not isinstance(info, Mapping):
        return None
    if isinstance(info.get("context_length"), int) and info["context_length"] > 0:
        return int(info["context_length"])
    models = info.get("data")
    if isinstance(models, list) and models and isinstance(models[0], Mapping):
        value = models[0].get("max_model_len")
        return int(value) if isinstance(value, int) and value > 0 else None
    return None


def context_from_model_dir(model_dir: str | None) -> int | None:
    """``max_position_embeddings`` from a Hugging Face model directory's ``config.json``, if readable."""
    if not model_dir:
        return None
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("max_position_embeddings") if isinstance(config, dict) else None
    return int(value) if isinstance(value, int) and value > 0 else None


async def _ask(engine: InfoSource) -> int | None:
    for path in ("/get_model_info", "/v1/models"):
        try:
            found = context_from_info(await engine.request("GET", path, timeout=10.0))
        except AgentRLError as exc:
            log.info("context length: %s failed (%s)", path, exc)
            continue
        if found is not None:
            return found
    return None


async def model_context_length(engines: Sequence[InfoSource], model_dir: str | None) -> int | None:
    """The smallest context length the engines report; else the model directory's max positions; else None."""
    found = [n for n in [await _ask(e) for e in engines] if n is not None]
    return min(found) if found else context_from_model_dir(model_dir)


def episode_budget(configured: int, model_limit: int | None) -> int:
    """Tokens per episode: ``configured`` (``worker.max_context_tokens``; 0 = not set) capped at the model's
    limit; 0 (unlimited) only when neither is known."""
    if configured and model_limit:
        return min(configured, model_limit)
    return configured or model_limit or 0
