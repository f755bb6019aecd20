"""Pure parts of the OpenAI-compatible routes and of the tiny tokenizer's tool-call handling."""

from __future__ import annotations

import json

from agentrl.engine.openai_api import parse_tool_calls
from agentrl.engine.tiny import train_tokenizer


def test_tool_calls_are_split_out_of_the_text() -> None:
    text = 'Let me check.\n<tool_call>\n{"name": "search", "arguments": {"q": "x"}}\n</tool_call>'
    content, calls = parse_tool_calls(text)
    assert content == "Let me check."
    assert len(calls) == 1 and calls[0]["type"] == "function"
    assert calls[0]["function"]["name"] == "search" and json.loads(calls[0]["function"]["arguments"]) == {"q": "x"}


def test_malformed_tool_calls_stay_text() -> None:
    text = "<tool_call>{not json}</tool_call> and <tool_call>[1]</tool_call>"
    assert parse_tool_calls(text) == (text, [])


def test_tool_tags_survive_decoding_without_special_tokens() -> None:
    tok = train_tokenizer(400)
    text = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    ids = tok(text + "<|im_end|>", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.convert_tokens_to_ids("<tool_call>") in ids
