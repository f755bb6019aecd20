"""The README's "Serving the trained model" snippet runs, verbatim, against a real ``agentrl engine``.

The engine serves a tiny model that memorised one tool conversation (rendered by its own chat template with the
snippet's tool schema), so the snippet's whole path runs: the model calls the calculator, the snippet runs the
tool and sends the result back with the call's id, and the model answers in text.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from agentrl.engine.tiny import TinyModelSpec, init_model
from tests.fixtures.engine import overfit, start_engine

REPO = Path(__file__).resolve().parents[2]
ANSWER = "The answer to 45*67+12 is 3027."


def readme_snippet() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme.split("### Serving the trained model", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README's serving section has no python block"
    return match.group(1)


def conversation(tools: list[dict[str, object]]) -> list[dict[str, object]]:
    call = {"id": "call_0", "type": "function",
            "function": {"name": "calculator", "arguments": json.dumps({"expression": "45*67+12"})}}
    return [{"role": "user", "content": "What is 45*67+12?"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_0", "content": "3027"},
            {"role": "assistant", "content": ANSWER}]


def tools_of(snippet: str) -> list[dict[str, object]]:
    scope: dict[str, object] = {}
    tools_src = re.search(r"^tools = .*?\]\]$|^tools = .*?\}\}\]$", snippet, re.S | re.M)
    assert tools_src, "no tools = [...] in the snippet"
    exec(tools_src.group(0), scope)
    tools = scope["tools"]
    assert isinstance(tools, list)
    return tools


def memorise(model_dir: Path, tools: list[dict[str, object]]) -> None:
    """Train the tiny model on the one conversation until greedy decoding reproduces it."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    overfit(model_dir, list(tok.apply_chat_template(conversation(tools), tools=tools, tokenize=True, return_dict=False)))


@pytest.mark.slow
def test_readme_openai_snippet_calls_the_tool_and_sends_the_result_back(tmp_path: Path) -> None:
    snippet = readme_snippet()
    model_dir = init_model(tmp_path / "model", TinyModelSpec(seed=1))
    torch.manual_seed(0)
    memorise(model_dir, tools_of(snippet))
    with start_engine(model_dir) as url:
        assert "http://127.0.0.1:30000/v1" in snippet  # the documented address; the test's engine has its own port
        code = snippet.replace("http://127.0.0.1:30000/v1", f"{url}/v1")
        out = io.StringIO()
        scope: dict[str, object] = {"__name__": "readme"}
        with contextlib.redirect_stdout(out):
            exec(compile(code, "README.md", "exec"), scope)
    messages = scope["messages"]
    assert isinstance(messages, list)
    roles = [m["role"] for m in messages]
    assert roles == ["user", "assistant", "tool", "assistant"], messages
    assert messages[1]["tool_calls"][0]["function"]["name"] == "calculator"
    assert messages[2] == {"role": "tool", "tool_call_id": messages[1]["tool_calls"][0]["id"], "content": "3027"}
    assert out.getvalue().strip() == ANSWER
