"""The calculator tool environment."""

from __future__ import annotations

from agentrl.agent import parse_action
from agentrl.env import Action, Environment, ToolCall
from agentrl.messages import ChatMessage, Task
from envs.calculator import CalculatorEnv

TASK = Task(id="t", group_id="g", prompt=[ChatMessage(role="user", content="12*(3+4)?")], env="calculator", label="84")


async def test_tool_calls_are_answered_and_final_answer_is_scored() -> None:
    env = CalculatorEnv()
    assert isinstance(env, Environment)
    obs = await env.reset(TASK)
    assert obs.tools and obs.tools[0]["function"]["name"] == "calculator"
    r = await env.step(Action(tool_calls=[ToolCall(name="calculator", arguments={"expression": "12*(3+4)"}),
                                          ToolCall(name="calculator", arguments={"expression": "1/3"})]))
    assert [m.content for m in r.observation.messages] == ["84", "1/3"] and not r.done
    assert (await env.step(Action(text="\\boxed{84}"))).reward == 1.0
    assert (await env.step(Action(text="\\boxed{85}"))).reward == 0.0
    await env.close()


async def test_bad_calls_become_error_observations() -> None:
    env = CalculatorEnv()
    await env.reset(TASK)
    cases = [
        (parse_action("<tool_call>{oops</tool_call>"), "error: tool call 0: invalid JSON"),
        (Action(tool_calls=[ToolCall(name="shell", arguments={})]), "error: unknown tool 'shell'"),
        (Action(tool_calls=[ToolCall(name="calculator", arguments={"expr": "1"})]), "error: calculator needs"),
        (Action(tool_calls=[ToolCall(name="calculator", arguments={"expression": "1/0"})]), "error: division by zero"),
        (Action(tool_calls=[ToolCall(name="calculator", arguments={"expression": "__import__('os')"})]),
         "error: unsupported syntax"),
    ]
    for action, expected in cases:
        r = await env.step(action)
        assert not r.done and r.observation.messages[0].content.startswith(expected)


def test_parse_action_formats() -> None:
    a = parse_action('think <tool_call>\n{"name": "calculator", "arguments": "{\\"expression\\": \\"2\\"}"}\n</tool_call>')
    assert a.error is None and a.tool_calls[0].arguments == {"expression": "2"}
    b = parse_action('<tool_call>{"name": 3}</tool_call><tool_call>{"name": "x", "arguments": {}}</tool_call>')
    assert [c.name for c in b.tool_calls] == ["x"] and b.error is not None and "string 'name'" in b.error
    assert parse_action("plain answer").tool_calls == []
