"""The official ``openai`` client against the engine's /v1 routes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
async def client(engine_url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    c = openai.AsyncOpenAI(base_url=engine_url + "/v1", api_key="unused", max_retries=0)
    async with c:
        yield c


async def test_models_lists_the_served_model(client: openai.AsyncOpenAI, tiny_model_dir: Path) -> None:
    models = await client.models.list()
    assert [m.id for m in models.data] == [tiny_model_dir.name]


async def test_chat_completion_with_logprobs_and_tools(client: openai.AsyncOpenAI, tiny_model_dir: Path) -> None:
    tools = [{"type": "function", "function": {"name": "calculator", "parameters": {"type": "object"}}}]
    out = await client.chat.completions.create(
        model=tiny_model_dir.name,
        messages=[{"role": "user", "content": "What is 2 + 2?"}],
        tools=tools,  # type: ignore[arg-type]
        max_tokens=7, temperature=0.8, seed=3, logprobs=True,
        extra_body={"ignore_eos": True},
    )
    choice = out.choices[0]
    assert choice.finish_reason == "length" and out.usage is not None and out.usage.completion_tokens == 7
    assert choice.logprobs is not None and choice.logprobs.content is not None
    lps = [c.logprob for c in choice.logprobs.content]
    assert len(lps) == 7 and all(lp <= 0 for lp in lps)
    extra = choice.model_extra or {}
    assert len(extra["token_ids"]) == 7 and extra["token_versions"] == [0] * 7
    again = await client.chat.completions.create(
        model=tiny_model_dir.name, messages=[{"role": "user", "content": "What is 2 + 2?"}], tools=tools,  # type: ignore[arg-type]
        max_tokens=7, temperature=0.8, seed=3, extra_body={"ignore_eos": True},
    )
    assert again.choices[0].message.content == choice.message.content


async def test_streaming_chat_reassembles_to_the_full_text(client: openai.AsyncOpenAI, tiny_model_dir: Path) -> None:
    kwargs = {"model": tiny_model_dir.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
              "temperature": 0.0, "extra_body": {"ignore_eos": True}}
    full = await client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    stream = await client.chat.completions.create(stream=True, **kwargs)  # type: ignore[call-overload]
    parts, finish = [], None
    async for chunk in stream:
        parts.append(chunk.choices[0].delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(parts) == full.choices[0].message.content and finish == "length"


async def test_completions_with_text_and_token_prompts(client: openai.AsyncOpenAI, tiny_model_dir: Path) -> None:
    out = await client.completions.create(
        model=tiny_model_dir.name, prompt="The answer is", max_tokens=5, temperature=0.0, logprobs=1,
        extra_body={"ignore_eos": True},
    )
    choice = out.choices[0]
    assert choice.logprobs is not None and len(choice.logprobs.token_logprobs or []) == 5
    by_ids = await client.completions.create(
        model=tiny_model_dir.name, prompt=[5, 6, 7], max_tokens=3, temperature=0.0, extra_body={"ignore_eos": True},
    )
    assert by_ids.usage is not None and by_ids.usage.prompt_tokens == 3


async def test_bad_openai_request_is_a_400(client: openai.AsyncOpenAI, tiny_model_dir: Path) -> None:
    with pytest.raises(openai.BadRequestError, match="temperature"):
        await client.chat.completions.create(
            model=tiny_model_dir.name, messages=[{"role": "user", "content": "x"}], temperature=7.0,
        )
