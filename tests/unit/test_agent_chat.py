"""Incremental chat rendering produces exactly the text a full render would, without re-rendering history."""

from __future__ import annotations

from typing import Any

import pytest

from agentrl.agent import ChatRenderer, TemplateError
from tests.fixtures.envs import build_tokenizer

TOOLS = [{"type": "function", "function": {"name": "calculator", "parameters": {}}}]


def _full(tok: Any, messages: list[dict[str, Any]]) -> str:
    return tok.apply_chat_template(messages, tools=TOOLS, tokenize=False, add_generation_prompt=True)


def test_incremental_text_equals_full_render(tiny_tokenizer: Any) -> None:
    chat = ChatRenderer(tiny_tokenizer)
    convo: list[dict[str, Any]] = [{"role": "user", "content": "What is 12*(3+4)?"}]
    text = _full(tiny_tokenizer, convo)
    turns = [
        ('<tool_call>{"name": "calculator", "arguments": {"expression": "12*(3+4)"}}</tool_call>',
         [{"role": "tool", "content": "84"}, {"role": "tool", "content": "7"}]),
        ("Let me check.", [{"role": "user", "content": "go on"}]),
    ]
    for reply, observation in turns:
        text += reply + "<|im_end|>"  # the model stops on its EOS token
        text += chat.delta_text(observation, after_model_text=reply + "<|im_end|>")
        convo += [{"role": "assistant", "content": reply}, *observation]
        assert text == _full(tiny_tokenizer, convo)


def test_glue_closes_a_turn_the_model_did_not_close(tiny_tokenizer: Any) -> None:
    chat = ChatRenderer(tiny_tokenizer)
    assert chat.unclosed("cut off mid-sent") == "<|im_end|>\n"
    assert chat.unclosed("done<|im_end|>") == "\n"
    assert chat.unclosed("x <") == "<|im_end|>\n"  # a stray '<' is not the start of the EOS token
    assert chat.strip_close("<tool_call>{}</tool_call><|im_end|>") == "<tool_call>{}</tool_call>"
    assert chat.strip_close("cut off") == "cut off"
    delta = chat.delta_text([{"role": "user", "content": "u"}], after_model_text=None)
    assert delta == "<|im_start|>user\nu<|im_end|>\n<|im_start|>assistant\n"


def test_delta_ids_tokenize_only_the_delta(tiny_tokenizer: Any) -> None:
    chat = ChatRenderer(tiny_tokenizer)
    ids = chat.delta_ids([{"role": "tool", "content": "84"}], after_model_text="a<|im_end|>")
    assert tiny_tokenizer.decode(ids, skip_special_tokens=False) == (
        "\n<|im_start|>user\n<tool_response>\n84\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )
    im_start = tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(im_start) == 2  # special-token text is parsed to the special token


def test_template_that_rewrites_the_last_assistant_turn_is_refused() -> None:
    tok = build_tokenizer()
    # The last assistant message is closed differently from earlier ones: appending cannot reproduce it.
    tok.chat_template = (
        "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' + m.content }}"
        "{%- if m.role == 'assistant' and loop.last %}{{- '<|im_end|>\\n\\n' }}{%- else %}{{- '<|im_end|>\\n' }}{%- endif %}"
        "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )
    chat = ChatRenderer(tok)
    with pytest.raises(TemplateError, match="cannot render incrementally"):
        chat.delta_text([{"role": "user", "content": "u"}], after_model_text="x")


def test_fast_paths_match_the_hugging_face_paths(tiny_tokenizer: Any) -> None:
    fast = ChatRenderer(tiny_tokenizer)
    assert fast._fast_render is not None and fast._fast_encode is not None and fast._fast_decode is not None
    slow = ChatRenderer(tiny_tokenizer)
    slow._fast_render = slow._fast_encode = slow._fast_decode = None
    messages = [{"role": "tool", "content": '{"x": 1} <tool_call>'}, {"role": "user", "content": "é ✓ 12*(3+4)"}]
    assert fast.delta_ids(messages, after_model_text="a") == slow.delta_ids(messages, after_model_text="a")
    prompt = [{"role": "user", "content": "What is 2+2?"}]
    assert fast.prompt_ids(prompt, tools=TOOLS) == slow.prompt_ids(prompt, tools=TOOLS)
    ids = fast.prompt_ids(prompt, tools=TOOLS)
    assert fast.decode(ids) == slow.decode(ids) == _full(tiny_tokenizer, prompt)
