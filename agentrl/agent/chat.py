"""Incremental chat-template rendering: only new messages are tokenized, never the history.

A multi-turn episode's token sequence grows by appending; re-rendering and
re-tokenizing the whole conversation each turn would cost O(N²) and — worse —
can produce different tokens than the engine actually consumed (BPE merges across
turn boundaries, templates that rewrite earlier turns such as Qwen3 dropping old
``<think>`` blocks). :class:`ChatRenderer` renders the *delta* a new message adds:

1. render a fixed tiny conversation ``[system, user, assistant(SENTINEL)]`` with and
   without the new messages appended, take what follows the sentinel in each; the
   new messages' text is the second minus the first (the assistant's closing text,
   e.g. ``<|im_end|>\\n``, is common to both);
2. prepend the part of the assistant's closing text the model did not generate
   itself (if the model stopped on ``<|im_end|>``, only ``\\n`` is left; if it was
   cut off by ``max_new_tokens``, the whole closing text);
3. tokenize that string alone and append it.

The cost per turn is independent of the history length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import msgspec

from agentrl.errors import AgentRLError
from agentrl.messages import ChatMessage

__all__ = ["ChatRenderer", "ChatTokenizer", "TemplateError"]

_SENTINEL = "AGENTRL_SENTINEL_5f1d"
_BASE: list[dict[str, Any]] = [
    {"role": "system", "content": "s"},
    {"role": "user", "content": "u"},
    {"role": "assistant", "content": _SENTINEL},
]


class TemplateError(AgentRLError, ValueError):
    """The tokenizer's chat template cannot be rendered incrementally (it rewrites earlier turns)."""


class ChatTokenizer(Protocol):
    """The part of a Hugging Face tokenizer agentrl uses (``PreTrainedTokenizerFast`` satisfies it)."""

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...

    def encode(self, text: str, **kwargs: Any) -> Any: ...

    def decode(self, token_ids: Any, **kwargs: Any) -> str: ...


def as_dicts(messages: Sequence[ChatMessage | dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages as the plain dicts chat templates expect."""
    return [m if isinstance(m, dict) else msgspec.to_builtins(m) for m in messages]


class ChatRenderer:
    """Renders prompts and incremental observation deltas through one tokenizer's chat template."""

    def __init__(self, tokenizer: ChatTokenizer) -> None:
        self.tokenizer = tokenizer
        self._fast_render: Callable[..., str] | None = None
        self._fast_encode: Callable[[str], list[int]] | None = None
        self._fast_decode: Callable[[Sequence[int]], str] | None = None
        base = self._render(_BASE, generation_prompt=False)
        self._close = _after_sentinel(base)  # what the template puts after an assistant message
        gen = self._render([*_BASE, {"role": "user", "content": "u"}], generation_prompt=True)
        nogen = self._render([*_BASE, {"role": "user", "content": "u"}], generation_prompt=False)
        if not gen.startswith(nogen):
            raise TemplateError("chat template: the generation prompt is not an append-only suffix")
        self.generation_prompt = gen[len(nogen) :]
        # The model can only have produced the closing text from its first token on (e.g. <|im_end|>):
        # a response that merely ends in "<" has not started closing its turn.
        first = self.encode(self._close)[:1]
        self._min_close = len(tokenizer.decode(first, skip_special_tokens=False)) if first else 0
        self._enable_fast_paths()

    def _enable_fast_paths(self) -> None:
        """Render deltas with the compiled template and tokenize with the Rust tokenizer directly
        (several times faster than the generic Hugging Face wrappers), if both give identical results."""
        probe = [*_BASE, {"role": "tool", "content": "84"}, {"role": "user", "content": "ok"}]
        slow_text = self._render(probe, generation_prompt=True)
        slow_ids = self.encode(slow_text)
        fast_render = _compiled_template(self.tokenizer)
        tools = [{"type": "function", "function": {"name": "probe", "parameters": {"type": "object"}}}]
        if (
            fast_render is not None
            and fast_render(probe, True) == slow_text
            and fast_render(probe, True, tools=tools) == self._render(probe, generation_prompt=True, tools=tools)
        ):
            self._fast_render = fast_render
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:

            def fast_encode(text: str) -> list[int]:
                return list(backend.encode(text, add_special_tokens=False).ids)

            if fast_encode(slow_text) == slow_ids:
                self._fast_encode = fast_encode

            def fast_decode(ids: Sequence[int]) -> str:
                return str(backend.decode(list(ids), skip_special_tokens=False))

            if fast_decode(slow_ids) == self.tokenizer.decode(slow_ids, skip_special_tokens=False):
                self._fast_decode = fast_decode

    def decode(self, token_ids: Sequence[int] | Any) -> str:
        """The text of ``token_ids`` with special tokens (what the engine saw)."""
        if self._fast_decode is not None:
            return self._fast_decode(token_ids)
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=False)

    def _render(self, messages: list[dict[str, Any]], *, generation_prompt: bool, **kw: Any) -> str:
        if self._fast_render is not None and set(kw) <= {"tools"}:
            return self._fast_render(messages, generation_prompt, **kw)
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt, **kw
        )
        if not isinstance(text, str):
            raise TemplateError(f"chat template rendered {type(text).__name__}, expected str")
        return text

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` exactly as written (no BOS/EOS added; special-token text is parsed)."""
        if self._fast_encode is not None:
            return self._fast_encode(text)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def prompt_ids(
        self,
        messages: Sequence[ChatMessage | dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """The first prompt: the whole conversation rendered once, ending with the generation prompt."""
        kw: dict[str, Any] = {"tools": tools} if tools else {}
        return self.encode(self._render(as_dicts(messages), generation_prompt=True, **kw))

    def delta_text(
        self,
        messages: Sequence[ChatMessage | dict[str, Any]],
        *,
        after_model_text: str | None,
        generation_prompt: bool = True,
    ) -> str:
        """The text that appending ``messages`` adds to a conversation.

        ``after_model_text`` is the raw text (special tokens included) of the model turn
        these messages follow, or ``None`` if they follow non-model tokens (then no
        assistant closing text is added).
        """
        new = as_dicts(messages)
        with_new = _after_sentinel(self._render([*_BASE, *new], generation_prompt=generation_prompt))
        if not with_new.startswith(self._close):
            raise TemplateError(
                "chat template renders an assistant turn differently once messages follow it "
                f"({self._close!r} vs {with_new[: len(self._close) + 20]!r}); cannot render incrementally"
            )
        delta = with_new[len(self._close) :]
        glue = "" if after_model_text is None else self.unclosed(after_model_text)
        return glue + delta

    def delta_ids(
        self,
        messages: Sequence[ChatMessage | dict[str, Any]],
        *,
        after_model_text: str | None,
        generation_prompt: bool = True,
    ) -> list[int]:
        """Token ids of :meth:`delta_text`: what to append (masked) to the trajectory."""
        return self.encode(
            self.delta_text(messages, after_model_text=after_model_text, generation_prompt=generation_prompt)
        )

    def strip_close(self, model_text: str) -> str:
        """``model_text`` without the end-of-turn text the model emitted (``<|im_end|>``, or the EOS token).

        Other special tokens stay: tool-call markers such as ``<tool_call>`` are special in some tokenizers.
        """
        emitted = len(self._close) - len(self.unclosed(model_text))
        text = model_text[: len(model_text) - emitted] if emitted else model_text
        eos = getattr(self.tokenizer, "eos_token", None)
        if isinstance(eos, str) and eos and text.endswith(eos):
            text = text[: -len(eos)]
        return text

    def unclosed(self, model_text: str) -> str:
        """The part of the assistant closing text (e.g. ``<|im_end|>\\n``) that ``model_text`` lacks."""
        close = self._close
        for k in range(len(close), max(self._min_close, 1) - 1, -1):
            if model_text.endswith(close[:k]):
                return close[k:]
        return close


def _compiled_template(tokenizer: Any) -> Callable[..., str] | None:
    """The tokenizer's chat template compiled once by transformers' own compiler, or None if unavailable."""
    template = getattr(tokenizer, "chat_template", None)
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:
        return None
    if not isinstance(template, str):
        return None
    compiled = _compile_jinja_template(template)
    specials = {k: v for k, v in getattr(tokenizer, "special_tokens_map", {}).items() if isinstance(v, str)}

    def render(messages: list[dict[str, Any]], generation_prompt: bool, tools: list[dict[str, Any]] | None = None) -> str:
        return str(compiled.render(messages=messages, add_generation_prompt=generation_prompt, tools=tools, **specials))

    return render


def _after_sentinel(text: str) -> str:
    i = text.rfind(_SENTINEL)
    if i < 0:
        raise TemplateError("chat template dropped the assistant message content; cannot render incrementally")
    return text[i + len(_SENTINEL) :]
