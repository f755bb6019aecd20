"""Token ids back to text with the run's tokenizer, when one can be found locally (never downloaded)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agentrl.errors import ConfigError
from agentrl.inspect.location import RunLocation

__all__ = ["TokenText", "load_token_text", "tokenizer_path"]

log = logging.getLogger(__name__)


class TokenText:
    """Decodes whole sequences and single tokens (a piece per token, for colouring token by token)."""

    def __init__(self, tokenizer: Any, source: str = "") -> None:
        self._tok = tokenizer
        self.source = source

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=False))

    def pieces(self, ids: Sequence[int]) -> list[str]:
        """One string per token; a character split across tokens shows as U+FFFD in each piece."""
        return [str(p) for p in self._tok.batch_decode([[int(i)] for i in ids], skip_special_tokens=False)]


def tokenizer_path(loc: RunLocation, explicit: str | None = None) -> Path | None:
    """``explicit``, else the run config's ``worker.tokenizer`` / ``engine.model`` / ``learner.model`` if it exists."""
    if explicit:
        path = Path(explicit)
        if not path.is_dir():
            raise ConfigError(f"--tokenizer {explicit}: not a directory (a Hugging Face tokenizer or model dir)")
        return path
    cfg = loc.config
    if cfg is None:
        return None
    for candidate in (cfg.worker.tokenizer, cfg.engine.model, cfg.learner.model):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


def load_token_text(loc: RunLocation, explicit: str | None = None) -> TokenText | None:
    """The run's tokenizer as a :class:`TokenText`, or ``None`` (logged) when none is found or it fails to load."""
    path = tokenizer_path(loc, explicit)
    if path is None:
        return None
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        if explicit:
            raise ConfigError(f"--tokenizer {explicit}: cannot load a tokenizer: {exc}") from exc
        log.warning("no tokenizer from %s (%s); showing turn texts and token ids", path, exc)
        return None
    return TokenText(tok, str(path))
