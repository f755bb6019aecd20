"""One generation request inside the engine: its options, its growing output, when it stops, and its reply.

The reply follows SGLang's ``/generate`` shape: ``text``, ``output_ids`` and ``meta_info`` with ``id``,
``finish_reason`` (``{"type": "stop", "matched": token id or string}``, ``{"type": "length", "length": n}``
or ``{"type": "abort", "message": ...}``), ``prompt_tokens``, ``completion_tokens``, ``cached_tokens``,
``weight_version`` (a string, as in SGLang), ``output_token_logprobs`` (``[logprob, token_id, text|None]``
triples, when asked for), ``input_token_logprobs`` (prompt positions from ``logprob_start_len`` on, the
first prompt token's logprob ``None``; same temperature contract as output logprobs) and the agentrl extra ``output_token_versions`` (the weight version each output
token was sampled under).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["Request", "RequestOptions", "Tokenizer"]


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer a request needs."""

    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


@dataclass
class RequestOptions:
    """Validated, engine-side sampling options of one request."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    seed: int = 0


@dataclass(eq=False)
class Request:
    """State of one request; mutated only on the event loop thread by the scheduler."""

    rid: str
    input_ids: list[int]
    options: RequestOptions
    return_logprob: bool = False
    logprob_text: bool = False
    stream: bool = False
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    finish_reason: dict[str, Any] | None = None
    cached_tokens: int = 0
    slot: int | None = None
    logprob_start: int | None = None  # first prompt position whose logprob is returned; None = none
    input_logprobs: list[float | None] = field(default_factory=list)  # positions logprob_start.. of the prompt
    kv_version: int = -1  # weight version when its keys/values started being computed
    abort_requested: bool = False
    created: float = field(default_factory=time.monotonic)
    updates: asyncio.Queue[bool] = field(default_factory=asyncio.Queue)  # True = finished

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token: int, logprob: float, version: int) -> None:
        self.output_ids.append(token)
        self.logprobs.append(logprob)
        self.versions.append(version)

    def check_stop(self, eos_ids: frozenset[int], tokenizer: Tokenizer) -> dict[str, Any] | None:
        """The finish reason the last appended token causes, or None to keep going."""
        opts, n = self.options, len(self.output_ids)
        if n >= opts.max_new_tokens:
            return {"type": "length", "length": n}
        if n < opts.min_new_tokens:
            return None
        token = self.output_ids[-1]
        if token in opts.stop_token_ids or (not opts.ignore_eos and token in eos_ids):
            return {"type": "stop", "matched": token}
        if opts.stop:
            width = max(len(s.encode()) for s in opts.stop) + 1
            tail = tokenizer.decode(self.output_ids[-width:], skip_special_tokens=opts.skip_special_tokens)
            for s in opts.stop:
                if s in tail:
                    return {"type": "stop", "matched": s}
        return None

    def set_prompt_logprobs(self, scored: list[float]) -> None:
        """Record prompt logprobs given for the last ``len(scored)`` prompt tokens (the first token has none)."""
        assert self.logprob_start is not None
        first_scored = len(self.input_ids) - len(scored)
        self.input_logprobs = [
            None if i < first_scored else scored[i - first_scored]
            for i in range(self.logprob_start, len(self.input_ids))
        ]

    def finish(self, reason: dict[str, Any]) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason
            self.updates.put_nowait(True)

    def text(self, tokenizer: Tokenizer) -> str:
        """Detokenized output; a matched stop string or stop token is trimmed unless ``no_stop_trim``."""
        opts, ids = self.options, self.output_ids
        matched = (self.finish_reason or {}).get("matched")
        if isinstance(matched, int) and not opts.no_stop_trim:
            ids = ids[:-1]
        text = tokenizer.decode(ids, skip_special_tokens=opts.skip_special_tokens)
        if isinstance(matched, str) and not opts.no_stop_trim and matched in text:
            text = text[: text.index(matched)]
        return text

    def reply(self, tokenizer: Tokenizer, weight_version: int) -> dict[str, Any]:
        """The SGLang-shaped ``/generate`` response for the request's current state."""
        meta: dict[str, Any] = {
            "id": self.rid,
            "finish_reason": self.finish_reason,
            "prompt_tokens": len(self.input_ids),
            "completion_tokens": len(self.output_ids),
            "cached_tokens": self.cached_tokens,
            "weight_version": str(weight_version),
            "output_token_versions": list(self.versions),
            "e2e_latency": time.monotonic() - self.created,
        }
        if self.return_logprob:
            meta["output_token_logprobs"] = [
                [lp, tok, tokenizer.decode([tok], skip_special_tokens=False) if self.logprob_text else None]
                for lp, tok in zip(self.logprobs, self.output_ids, strict=True)
            ]
        if self.return_logprob and self.logprob_start is not None:
            meta["input_token_logprobs"] = [
                [lp, tok, None] for lp, tok in zip(self.input_logprobs, self.input_ids[self.logprob_start :], strict=False)
            ]
        return {"text": self.text(tokenizer), "output_ids": list(self.output_ids), "meta_info": meta}
