"""Constrained decoding with xgrammar: ``regex``, ``json_schema`` and ``ebnf`` sampling params, as in SGLang.

A :class:`GrammarCompiler` (one per engine, built on first use) compiles a grammar against the served
tokenizer, caching compiled grammars by source; each request gets its own :class:`RequestGrammar` (a
matcher) that yields the allowed-token mask before every step and accepts the sampled token after it. The
request stops (``finish_reason`` ``stop``, matched = the end token) when the grammar is complete.
``json_schema`` ``"$$ANY$$"`` means any JSON value, as in SGLang.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, Literal

import torch

from agentrl.errors import AgentRLError

__all__ = ["GRAMMAR_KINDS", "GrammarCompiler", "GrammarError", "RequestGrammar"]

GrammarKind = Literal["regex", "json_schema", "ebnf"]
GRAMMAR_KINDS: tuple[GrammarKind, ...] = ("regex", "json_schema", "ebnf")
_BITS = torch.arange(32, dtype=torch.int64)


class GrammarError(AgentRLError, ValueError):
    """The grammar does not compile (the message says why), or xgrammar is not installed."""


class RequestGrammar:
    """One request's position in its grammar."""

    def __init__(self, compiled: Any, stop_ids: list[int]) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self.matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=stop_ids)
        self._bitmask = xgr.allocate_token_bitmask(1, compiled.tokenizer_info.vocab_size)

    def allowed_mask(self, vocab_size: int) -> torch.Tensor:
        """``[vocab_size]`` bool: which tokens the grammar allows next."""
        self.matcher.fill_next_token_bitmask(self._bitmask, 0)
        bits = (self._bitmask.view(-1).to(torch.int64).unsqueeze(-1) >> _BITS) & 1
        allowed = bits.view(-1).bool()
        if len(allowed) >= vocab_size:
            return allowed[:vocab_size]
        return torch.cat([allowed, torch.zeros(vocab_size - len(allowed), dtype=torch.bool)])

    def accept(self, token: int) -> bool:
        """Advance past ``token``; False if the grammar does not allow it."""
        return bool(self.matcher.accept_token(token))

    @property
    def terminated(self) -> bool:
        return bool(self.matcher.is_terminated())


class GrammarCompiler:
    """Compiles grammars for one tokenizer; thread-safe, with an LRU cache of ``cache_size`` grammars."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: Iterable[int], cache_size: int = 64) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_ids = sorted(stop_ids)
        self.cache_size = cache_size
        self._compiler: Any = None
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, kind: GrammarKind, source: str) -> Any:
        """A compiled grammar; raises :class:`GrammarError` naming what is wrong with ``source``."""
        key = (kind, source)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            compiled = self._compile(kind, source)
            self._cache[key] = compiled
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return compiled

    def matcher(self, compiled: Any) -> RequestGrammar:
        return RequestGrammar(compiled, self.stop_ids)

    def _compile(self, kind: GrammarKind, source: str) -> Any:
        compiler = self._get_compiler()
        try:
            if kind == "regex":
                return compiler.compile_regex(source)
            if kind == "ebnf":
                return compiler.compile_grammar(source)
            if source == "$$ANY$$":
                return compiler.compile_builtin_json_grammar()
            json.loads(source)
            return compiler.compile_json_schema(source)
        except (RuntimeError, ValueError) as exc:
            raise GrammarError(_first_line(exc)) from exc

    def _get_compiler(self) -> Any:
        if self._compiler is None:
            try:
                import xgrammar as xgr
            except ImportError as exc:
                raise GrammarError("constrained decoding needs xgrammar: pip install 'agentrl[engine]'") from exc
            info = xgr.TokenizerInfo.from_huggingface(
                self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_ids
            )
            self._compiler = xgr.GrammarCompiler(info)
        return self._compiler


def _first_line(exc: Exception) -> str:
    """The message without xgrammar's timestamp and C++ source location."""
    lines = str(exc).strip().splitlines()
    last = lines[-1] if lines else type(exc).__name__
    return re.sub(r"^(\[[^\]]*\]\s*)?\S+\.(cc|h):\d+:\s*", "", last)
