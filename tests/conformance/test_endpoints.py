"""SGLang conformance: the tokenizer, load and info endpoints.

Behaviour checked (SGLang's TestTokenizeDetokenize, test_get_server_info): ``/tokenize`` takes a text or a
list of texts (``tokens`` + ``count`` + ``max_model_len``), ``/v1/tokenize`` also chat ``messages`` with
``tools`` (``tool_choice: "none"`` drops them); ``/detokenize`` round-trips; bad types are 400;
``/get_server_info`` (and ``/server_info``) has an int ``max_total_num_tokens`` and a str ``version``;
``/get_load`` reports requests and tokens; keys never appear in server info.
"""

from __future__ import annotations

from pathlib import Path

from tests.conformance.calls import get, post


async def test_tokenize_text_lists_and_empty(engine_url: str, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    status, out = await post(engine_url, "/tokenize", {"prompt": "Hello world! 123", "add_special_tokens": False})
    assert status == 200 and out["tokens"] == tok.encode("Hello world! 123", add_special_tokens=False)
    assert out["count"] == len(out["tokens"]) and out["max_model_len"] == 2048
    status, out = await post(engine_url, "/tokenize", {"prompt": ["First.", "Second, longer."]})
    assert status == 200 and [len(t) for t in out["tokens"]] == out["count"]
    status, out = await post(engine_url, "/tokenize", {"prompt": ""})
    assert status == 200 and out["tokens"] == [] and out["count"] == 0
    status, out = await post(engine_url, "/tokenize", {"prompt": 12345})
    assert status == 400 and out["error"]["param"] == "prompt"


async def test_tokenize_chat_messages_with_and_without_tools(engine_url: str, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    status, plain = await post(engine_url, "/v1/tokenize", {"messages": messages})
    assert status == 200 and plain["tokens"] == list(tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    _, with_tools = await post(engine_url, "/v1/tokenize", {"messages": messages, "tools": tools})
    assert with_tools["tokens"] != plain["tokens"] and with_tools["count"] == len(with_tools["tokens"])
    _, none = await post(engine_url, "/v1/tokenize", {"messages": messages, "tools": tools, "tool_choice": "none"})
    assert none["tokens"] == plain["tokens"]


async def test_detokenize_round_trip_and_bad_tokens(engine_url: str) -> None:
    text = "Verify detokenization round trip."
    _, out = await post(engine_url, "/tokenize", {"prompt": text, "add_special_tokens": False})
    status, back = await post(engine_url, "/detokenize", {"tokens": out["tokens"]})
    assert status == 200 and back["text"] == text
    _, both = await post(engine_url, "/v1/detokenize", {"tokens": [out["tokens"], []]})
    assert both["text"] == [text, ""]
    _, empty = await post(engine_url, "/detokenize", {"tokens": []})
    assert empty["text"] == ""
    for tokens, field in [(["a", "b"], "tokens"), ([1, -1, 2], "tokens"), ([[1], [2**64]], "tokens[1]")]:
        status, err = await post(engine_url, "/detokenize", {"tokens": tokens})
        assert status == 400 and err["error"]["param"] == field


async def test_server_info_load_and_model_info(engine_url: str) -> None:
    for path in ("/get_server_info", "/server_info"):
        status, info = await get(engine_url, path)
        assert status == 200 and isinstance(info["max_total_num_tokens"], int) and isinstance(info["version"], str)
        assert "api_key" not in info and "admin_api_key" not in info.get("client", {})
        assert info["internal_states"][0]["num_running_reqs"] >= 0
    status, load = await get(engine_url, "/get_load")
    assert status == 200 and set(load[0]) == {"dp_rank", "num_reqs", "num_waiting_reqs", "num_tokens"}
    for path in ("/get_model_info", "/model_info"):
        status, info = await get(engine_url, path)
        assert status == 200 and info["is_generation"] is True and info["weight_version"] == "0"
