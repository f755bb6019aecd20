"""One generation request inside the engine: its options, its growing output, when it stops, and its reply.

The reply follows SGLang's ``/generate`` shape: ``text``, ``output_ids`` and ``meta_info`` with ``id``,
``finish_reason`` (``{"type": "stop", "matched": token id or string}``, ``{"type": "length", "length": n}``
or ``{"type": "abort", "message": ...}``), ``prompt_tokens``, ``completion_tokens``, ``cached_tokens``,
``weight_version`` (a string, as in SGLang) and, with ``return_logprob``:

- ``input_token_logprobs`` / ``output_token_logprobs``: ``[logprob, token_id, text|None]`` per token
  (prompt positions from ``logprob_start_len`` on; the first prompt token has logprob ``None``);
- with ``top_logprobs_num`` k > 0, ``input_top_logprobs`` / ``output_top_logprobs``: the k most likely tokens
  at each position as such triples, best first (``None`` where there is no distribution);
- with ``token_ids_logprob``, ``input_token_ids_logprobs`` / ``output_token_ids_logprobs``: those tokens'
  triples at each position.

``text`` is filled in every triple when ``return_text_in_logprobs`` is set. All logprobs are
``log_softmax(logits / T)`` (``T = 1`` for greedy) after logit bias, penalties, custom processors and grammar
masks, before top-k/top-p/min-p truncation. The agentrl extra ``output_token_versions`` gives the weight
version each output token was sampled under.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from agentrl.engine.grammar import RequestGrammar
    from agentrl.engine.kv_cache import KVSeq
    from agentrl.engine.logits import CustomCall

__all__ = ["LogprobSpec", "Request", "RequestOptions", "Tokenizer"]

Triple = list[Any]  # [logprob | None, token_id, text | None]


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
    logit_bias: dict[int, float] | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0


@dataclass
class LogprobSpec:
    """Which logprobs a request returns (``return_logprob`` and friends)."""

    start: int | None = None  # first prompt position reported; None = no prompt positions
    top_k: int = 0
    token_ids: list[int] | None = None
    text: bool = False


@dataclass
class _Scores:
    """Logprobs recorded for a run of positions (prompt or output), aligned with their tokens."""

    chosen: list[float | None] = field(default_factory=list)
    top: list[list[tuple[float, int]] | None] = field(default_factory=list)
    ids: list[list[float] | None] = field(default_factory=list)


@dataclass(eq=False)
class Request:
    """State of one request; mutated only on the event loop thread by the scheduler."""

    rid: str
    input_ids: list[int]
    options: RequestOptions
    return_logprob: bool = False
    logprobs_spec: LogprobSpec = field(default_factory=LogprobSpec)
    stream: bool = False
    stream_interval: int = 1  # streamed chunks every this many tokens (SGLang's sampling_params.stream_interval)
    grammar: RequestGrammar | None = None
    custom: CustomCall | None = None
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    output_scores: _Scores = field(default_factory=_Scores)
    input_scores: _Scores = field(default_factory=_Scores)  # prompt positions logprobs_spec.start..
    finish_reason: dict[str, Any] | None = None
    cached_tokens: int = 0
    computed: int = 0  # leading tokens whose keys/values its row holds (the cache hit, then a long prompt's pieces)
    row: int | None = None  # row of the runner's table while running
    kv: KVSeq | None = None
    kv_version: int = -1  # weight version when its keys/values started being computed
    abort_requested: bool = False
    created: float = field(default_factory=time.monotonic)
    admitted: float | None = None
    updates: asyncio.Queue[bool] = field(default_factory=asyncio.Queue)  # True = finished

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def logprob_start(self) -> int | None:
        return self.logprobs_spec.start if self.return_logprob else None

    @property
    def error_status(self) -> int | None:
        """HTTP status of a request the engine gave up on (a timeout: 503), else None."""
        status = (self.finish_reason or {}).get("status_code")
        return int(status) if status else None

    def append(self, token: int, logprob: float, version: int) -> None:
        self.output_ids.append(token)
        self.logprobs.append(logprob)
        self.versions.append(version)

    def check_stop(self, eos_ids: frozenset[int], tokenizer: Tokenizer) -> dict[str, Any] | None:
        """The finish reason the last appended token causes, or None to keep going."""
        opts, n = self.options, len(self.output_ids)
        token = self.output_ids[-1]
        if self.grammar is not None and self.grammar.terminated:
            return {"type": "stop", "matched": token}
        if n >= opts.max_new_tokens:
            return {"type": "length", "length": n}
        if n < opts.min_new_tokens:
            return None
        if token in opts.stop_token_ids or (not opts.ignore_eos and token in eos_ids):
            return {"type": "stop", "matched": token}
        if opts.stop:
            width = max(len(s.encode()) for s in opts.stop) + 1
            tail = tokenizer.decode(self.output_ids[-width:], skip_special_tokens=opts.skip_special_tokens)
            for s in opts.stop:
                if s in tail:
                    return {"type": "stop", "matched": s}
        return None

    def set_prompt_scores(self, chosen: list[float], top: list[list[tuple[float, int]]] | None,
                          ids: list[list[float]] | None) -> None:
        """Record prompt scores given for the last ``len(chosen)`` prompt tokens (the first token has none)."""
        start = self.logprob_start
        assert start is not None
        first_scored = len(self.input_ids) - len(chosen)
        s = self.input_scores
        for i in range(start, len(self.input_ids)):
            j = i - first_scored
            s.chosen.append(chosen[j] if j >= 0 else None)
            s.top.append(top[j] if top is not None and j >= 0 else None)
            s.ids.append(ids[j] if ids is not None and j >= 0 else None)

    def finish(self, reason: dict[str, Any]) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason
            self.updates.put_nowait(True)

    def text(self, tokenizer: Tokenizer) -> str:
        """Detokenized output; a matched stop string or stop token is trimmed unless ``no_stop_trim``."""
        opts, ids = self.options, self.output_ids
        matched = (self.finish_reason or {}).get("matched")
        if isinstance(matched, int) and not opts.no_stop_trim and ids and ids[-1] == matched:
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
            meta.update(self._logprob_meta(tokenizer))
        return {"text": self.text(tokenizer), "output_ids": list(self.output_ids), "meta_info": meta}

    def _logprob_meta(self, tokenizer: Tokenizer) -> dict[str, Any]:
        spec = self.logprobs_spec
        start = spec.start if spec.start is not None else len(self.input_ids)
        prompt = self.input_ids[start:][: len(self.input_scores.chosen)]
        text = _Texts(tokenizer) if spec.text else None
        out_scores = _Scores(list(self.logprobs), self.output_scores.top, self.output_scores.ids)
        meta: dict[str, Any] = {}
        for where, tokens, scores in (("input", prompt, self.input_scores), ("output", self.output_ids, out_scores)):
            meta[f"{where}_token_logprobs"] = [_triple(lp, t, text) for lp, t in zip(scores.chosen, tokens, strict=False)]
            if spec.top_k:
                meta[f"{where}_top_logprobs"] = [
                    None if top is None else [_triple(lp, t, text) for lp, t in top] for top in scores.top
                ]
            if spec.token_ids is not None:
                meta[f"{where}_token_ids_logprobs"] = [
                    None if row is None else [_triple(lp, t, text) for lp, t in zip(row, spec.token_ids, strict=True)]
                    for row in scores.ids
                ]
        return meta


class _Texts:
    """Per-token text for logprob triples, decoded once per token id."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        if token not in self.cache:
            self.cache[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return self.cache[token]


def _triple(logprob: float | None, token: int, text: _Texts | None) -> Triple:
    return [logprob, token, text(token) if text is not None else None]
