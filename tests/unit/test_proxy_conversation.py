"""History matching and reply formatting of the recording OpenAI proxy (pure)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from agentrl.errors import ProxyRequestError
from agentrl.proxy import assistant_message, normalize_messages, plan

USER = {"role": "user", "content": "What is 12*3?"}
CALL_TEXT = '<tool_call>{"name": "calculator", "arguments": {"expression": "12*3"}}</tool_call>'


def _reply() -> dict[str, Any]:
    return assistant_message(CALL_TEXT)


def _tool(reply: dict[str, Any]) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": reply["tool_calls"][0]["id"], "content": "36"}


def test_model_tool_calls_come_back_as_openai_tool_calls() -> None:
    msg = assistant_message("Let me compute. " + CALL_TEXT)
    assert msg["content"] == "Let me compute."
    (call,) = msg["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "calculator"
    assert json.loads(call["function"]["arguments"]) == {"expression": "12*3"}
    assert _reply()["content"] is None  # only a tool call: no text
    # a malformed block is left as text, as the tool agent would show the model its error
    bad = '<tool_call>{"name": "calculator", "arguments": [1]}</tool_call>'
    assert assistant_message(bad) == {"role": "assistant", "content": bad}
    assert "tool_calls" not in assistant_message("The answer is 36.")


def test_request_extending_the_recording_adds_only_the_new_messages() -> None:
    reply = _reply()
    recorded = normalize_messages([USER, reply])
    sent = normalize_messages([USER, reply, _tool(reply)])
    assert plan(recorded, {1}, sent, resumed=False).new == [sent[2]]
    assert plan([], set(), sent[:1], resumed=False).new == sent[:1]


def test_resent_reply_matches_whatever_the_client_did_to_ids_and_json() -> None:
    reply = _reply()
    recorded = normalize_messages([USER, reply])
    echoed = {"role": "assistant", "content": "", "tool_calls": [
        {"id": "renamed", "type": "function",
         "function": {"name": "calculator", "arguments": json.dumps({"expression": "12*3"}, indent=2)}}]}
    assert plan(recorded, {1}, normalize_messages([USER, echoed, _tool(reply)]), resumed=False).new[0]["role"] == "tool"
    parts = {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "12*3?"}]}
    assert plan(recorded, {1}, normalize_messages([parts, reply]), resumed=False).new == []


@pytest.mark.parametrize("edit", ["user", "arguments", "drop", "reorder"])
def test_a_history_that_does_not_extend_the_recording_is_refused(edit: str) -> None:
    reply = _reply()
    tool = _tool(reply)
    recorded = normalize_messages([USER, reply, tool])
    changed = json.loads(json.dumps(reply))
    changed["tool_calls"][0]["function"]["arguments"] = '{"expression": "12*4"}'
    sent = {
        "user": [{"role": "user", "content": "What is 12*4?"}, reply, tool],
        "arguments": [USER, changed, tool],
        "drop": [USER, tool],
        "reorder": [USER, tool, reply],
    }[edit]
    with pytest.raises(ProxyRequestError) as err:
        plan(recorded, {1}, normalize_messages(sent), resumed=False)
    assert err.value.code == "history_mismatch" and "differs from what this episode recorded" in str(err.value)


def test_a_prefix_replays_a_recorded_reply_only_in_a_resumed_episode() -> None:
    reply = _reply()
    recorded = normalize_messages([USER, reply, _tool(reply)])
    assert plan(recorded, {1}, normalize_messages([USER]), resumed=True).replay == 1
    with pytest.raises(ProxyRequestError, match="would fork the conversation"):
        plan(recorded, {1}, normalize_messages([USER]), resumed=False)
    with pytest.raises(ProxyRequestError, match="continues with tool message"):  # not at a reply boundary
        plan(recorded, {1}, normalize_messages([USER, reply]), resumed=True)


@pytest.mark.parametrize(("messages", "why"), [
    ([], "non-empty list"),
    ([{"role": "robot", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "only text parts"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"function": {}}]}], "tool_calls[0]"),
])
def test_bad_messages_are_refused_naming_the_field(messages: list[Any], why: str) -> None:
    with pytest.raises(ProxyRequestError, match=why.replace("[", r"\[").replace("]", r"\]")):
        normalize_messages(messages)


def test_engine_renders_a_returned_tool_call_turn_as_the_model_wrote_it() -> None:
    from agentrl.engine.openai_api import TurnMemory

    memory = TurnMemory(size=2)
    reply = _reply()
    memory.remember(CALL_TEXT, reply)
    echoed = {**reply, "content": ""}  # clients often send "" (or drop content) with tool calls
    tool = _tool(reply)
    assert memory.restore([USER, echoed, tool]) == [USER, {"role": "assistant", "content": CALL_TEXT}, tool]
    edited = json.loads(json.dumps(reply))
    edited["tool_calls"][0]["function"]["arguments"] = '{"expression": "12*4"}'
    assert memory.restore([edited])[0] is edited  # not what the engine answered: the template renders it
    for _ in range(2):
        memory.remember(CALL_TEXT, _reply())
    assert memory.restore([echoed])[0] is echoed  # forgotten (least recently answered first)
