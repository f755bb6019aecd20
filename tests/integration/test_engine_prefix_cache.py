"""The radix prefix cache on real engine processes: hit lengths, eviction under memory pressure, and logprobs
that are the same with and without a hit (and equal to one forward pass of the model)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conformance.calls import generate, get, post
from tests.fixtures.engine import start_engine

torch.set_num_threads(1)


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(5, 500) for _ in range(n)]


async def turn(url: str, ids: list[int], new: int = 10, **sampling: Any) -> dict[str, Any]:
    return dict(await generate(url, {"input_ids": ids, "return_logprob": True, "sampling_params": {
        "max_new_tokens": new, "ignore_eos": True, "temperature": 1.0, **sampling}}))


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def reference(model: Any, prompt: list[int], output: list[int], temperature: float) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([prompt + output])).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(output).view(-1, 1)).view(-1)


async def test_a_multi_turn_conversation_reuses_everything_it_sent_and_received(engine_url: str) -> None:
    system, history = tokens(40, 1), []
    ids = system + tokens(12, 2)
    for k in range(4):
        out = await turn(engine_url, ids)
        if k:
            assert out["meta_info"]["cached_tokens"] == len(history) - 1  # all but the last token fed back
        history = ids + out["output_ids"]
        ids = history + tokens(7, 10 + k)  # the tool result of this turn
    other = await turn(engine_url, system + tokens(5, 99))  # another conversation, same system prompt
    assert other["meta_info"]["cached_tokens"] == len(system)


async def test_logprobs_are_the_same_with_and_without_a_hit(engine_url: str, hf_model: Any) -> None:
    prompt = tokens(200, 3)
    status, _ = await post(engine_url, "/flush_cache")
    assert status == 200
    cold = await turn(engine_url, prompt, 16, sampling_seed=7, temperature=0.8)
    warm = await turn(engine_url, prompt, 16, sampling_seed=7, temperature=0.8)
    assert cold["meta_info"]["cached_tokens"] == 0 and warm["meta_info"]["cached_tokens"] == 198
    assert warm["output_ids"] == cold["output_ids"]
    for out in (cold, warm):
        got = torch.tensor([t[0] for t in out["meta_info"]["output_token_logprobs"]])
        assert (got - reference(hf_model, prompt, out["output_ids"], 0.8)).abs().max().item() <= 1e-4


@pytest.fixture(scope="module")
def small_pool_engine(tiny_model_dir: Path) -> Iterator[str]:
    """A KV pool of 2,400 positions: four 500-token conversations cannot all stay cached."""
    with start_engine(tiny_model_dir, "--max-running", "2", "--context-length", "1024",
                      "--set", "engine.max_total_tokens=2400") as url:
        yield url


async def test_eviction_under_memory_pressure_drops_the_least_recently_used(small_pool_engine: str, hf_model: Any) -> None:
    url = small_pool_engine
    convs = [tokens(500, 20 + i) for i in range(4)]
    for c in convs[:3]:
        await turn(url, c, 4)
    assert (await turn(url, convs[0], 4))["meta_info"]["cached_tokens"] == 498  # touch conversation 0
    await turn(url, convs[3], 500)  # needs 1,000 positions: the least recently used (1) must go
    hits = {i: (await turn(url, convs[i], 4))["meta_info"]["cached_tokens"] for i in (3, 0)}
    assert hits == {3: 498, 0: 498}
    assert (await turn(url, convs[1], 4))["meta_info"]["cached_tokens"] == 0  # evicted
    _, info = await get(url, "/get_server_info")
    state = info["internal_states"][0]
    assert state["cached_tokens_in_tree"] <= info["max_total_num_tokens"] == 2400
    out = await turn(url, convs[2] + tokens(30, 77), 20, temperature=0.7)  # still exact after evictions
    got = torch.tensor([t[0] for t in out["meta_info"]["output_token_logprobs"]])
    assert (got - reference(hf_model, convs[2] + tokens(30, 77), out["output_ids"], 0.7)).abs().max().item() <= 1e-4
