"""A tool call sent back in the standard OpenAI form renders exactly as in training (issue 17, item 10).

The model memorises one quickstart conversation, rendered as the quickstart's SFT renders its demonstrations
(the tool call written by the model inside its turn, no tool schema), and is served by a real ``agentrl engine``.
An OpenAI client asks, gets the call back as ``tool_calls``, runs the tool and sends the standard form back
(assistant ``tool_calls`` + a ``tool`` message with its ``tool_call_id``). Before the fix the chat template
re-rendered the call in its own layout, which the model never saw in training, and the model answered garbage;
now the engine renders the model's own turn, so it reads its training conversation and answers.
"""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
from transformers import AutoTokenizer

from agentrl.engine.tiny import TinyModelSpec, init_model
from envs.quickstart import demonstration
from tests.fixtures.engine import overfit, start_engine

pytestmark = pytest.mark.slow

QUESTION, EXPR, ANSWER = "What is 45*67+12?", "45*67+12", "3027"
CONVERSATION = demonstration(QUESTION, EXPR, ANSWER, use_tool=True)


def memorise(model_dir: Path) -> str:
    """Train the tiny model on the conversation as SFT renders it; return that text."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    text = str(tok.apply_chat_template(CONVERSATION, tokenize=False))
    overfit(model_dir, tok.encode(text, add_special_tokens=False))
    return text


async def test_tool_call_sent_back_in_openai_form_renders_as_in_training(tmp_path: Path) -> None:
    model_dir = init_model(tmp_path / "model", TinyModelSpec(seed=1))
    trained = memorise(model_dir)
    with start_engine(model_dir) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none")
        messages: list[dict[str, object]] = [{"role": "user", "content": QUESTION}]
        first = await client.chat.completions.create(model="m", messages=messages, temperature=0,  # type: ignore[arg-type]
                                                     max_tokens=48)
        reply = first.choices[0].message
        assert reply.tool_calls and reply.tool_calls[0].function.name == "calculator", reply
        messages += [reply.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": reply.tool_calls[0].id, "content": ANSWER}]
        second = await client.chat.completions.create(model="m", messages=messages, temperature=0,  # type: ignore[arg-type]
                                                      max_tokens=48)
    tok = AutoTokenizer.from_pretrained(model_dir)
    served = tok.decode(second.model_extra["prompt_token_ids"], skip_special_tokens=False)  # type: ignore[index]
    answer = second.choices[0].message.content
    assert answer == CONVERSATION[-1]["content"], f"the model answered {answer!r} to the served prompt {served!r}"
    assert trained.startswith(served), f"served prompt:\n{served!r}\ntraining text:\n{trained!r}"
