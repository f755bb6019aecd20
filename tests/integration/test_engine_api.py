"""The embedded engine as a real process: SGLang native API behaviour on a tiny random model."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import torch

torch.set_num_threads(1)


async def post(url: str, path: str, body: Any, *, raw: bytes | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.post(url + path, json=None if raw else body, data=raw) as r:
        text = await r.text()
        try:
            return r.status, await r.json(content_type=None) if text else None
        except ValueError:
            return r.status, text


async def generate(url: str, ids: list[int], **sampling: Any) -> dict[str, Any]:
    status, out = await post(url, "/generate", {"input_ids": ids, "sampling_params": sampling, "return_logprob": True})
    assert status == 200, out
    return out


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def reference_logprobs(model: Any, prompt: list[int], output: list[int], temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) of each output token from one plain forward pass over prompt + output."""
    ids = torch.tensor([prompt + output])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
    logp = torch.log_softmax(logits / (temperature if temperature > 0 else 1.0), dim=-1)
    return logp.gather(-1, torch.tensor(output).view(-1, 1)).view(-1)


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(5, 500) for _ in range(n)]


async def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(engine_url: str) -> None:
    p = prompt(12, 1)
    params = {"temperature": 1.0, "max_new_tokens": 24, "sampling_seed": 1234, "ignore_eos": True}
    alone = await generate(engine_url, p, **params)
    noise = [generate(engine_url, prompt(8, i), temperature=1.0, max_new_tokens=30, ignore_eos=True) for i in range(6)]
    together, *_ = await asyncio.gather(generate(engine_url, p, **params), *noise)
    other = await generate(engine_url, p, **{**params, "sampling_seed": 99})
    assert together["output_ids"] == alone["output_ids"]
    assert other["output_ids"] != alone["output_ids"]


async def test_logprobs_match_a_forward_pass_before_truncation(engine_url: str, hf_model: Any) -> None:
    p = prompt(20, 2)
    out = await generate(engine_url, p, temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=32, ignore_eos=True)
    triples = out["meta_info"]["output_token_logprobs"]
    assert [t[1] for t in triples] == out["output_ids"] and len(triples) == 32
    ref = reference_logprobs(hf_model, p, out["output_ids"], 0.7)
    got = torch.tensor([t[0] for t in triples])
    assert (got - ref).abs().max().item() <= 1e-4


async def test_prompt_logprobs_from_logprob_start_len_match_a_forward_pass(engine_url: str, hf_model: Any) -> None:
    p = prompt(16, 13)
    await generate(engine_url, p, max_new_tokens=2)  # leaves p cached: scoring must not reuse it
    body = {"input_ids": p, "return_logprob": True, "logprob_start_len": 3,
            "sampling_params": {"max_new_tokens": 1, "temperature": 0.8}}
    status, out = await post(engine_url, "/generate", body)
    assert status == 200, out
    triples = out["meta_info"]["input_token_logprobs"]
    assert [t[1] for t in triples] == p[3:]
    with torch.no_grad():
        logits = hf_model(torch.tensor([p])).logits[0, :-1].float()
    ref = torch.log_softmax(logits / 0.8, -1).gather(-1, torch.tensor(p[1:]).view(-1, 1)).view(-1)[2:]
    assert (torch.tensor([t[0] for t in triples]) - ref).abs().max().item() <= 1e-4
    status, out = await post(engine_url, "/generate", {**body, "logprob_start_len": 0})
    assert out["meta_info"]["input_token_logprobs"][0][0] is None and len(out["meta_info"]["input_token_logprobs"]) == 16
    status, out = await post(engine_url, "/generate", {**body, "logprob_start_len": 16})
    assert status == 400 and out["error"]["param"] == "logprob_start_len"


async def test_64_concurrent_requests_with_different_params_all_complete(engine_url: str, hf_model: Any) -> None:
    rng = random.Random(3)
    specs = []
    for i in range(64):
        temperature = rng.choice([0.0, 0.5, 1.0, 1.3])
        specs.append((prompt(rng.randint(3, 40), 100 + i), {
            "temperature": temperature, "top_p": rng.choice([1.0, 0.8]), "top_k": rng.choice([-1, 5, 50]),
            "max_new_tokens": rng.randint(1, 24), "ignore_eos": True, "sampling_seed": i,
        }))
    outs = await asyncio.gather(*(generate(engine_url, p, **s) for p, s in specs))
    for (_, s), out in zip(specs, outs, strict=True):
        assert out["meta_info"]["finish_reason"] == {"type": "length", "length": s["max_new_tokens"]}
        assert len(out["output_ids"]) == s["max_new_tokens"] == len(out["meta_info"]["output_token_logprobs"])
    for (p, s), out in list(zip(specs, outs, strict=True))[:8]:  # spot-check logprobs and greedy outputs
        ref = reference_logprobs(hf_model, p, out["output_ids"], s["temperature"])
        got = torch.tensor([t[0] for t in out["meta_info"]["output_token_logprobs"]])
        assert (got - ref).abs().max().item() <= 1e-4
        if s["temperature"] == 0:
            assert out["output_ids"] == (await generate(engine_url, p, **s))["output_ids"]


async def test_abort_returns_partial_output(engine_url: str) -> None:
    task = asyncio.create_task(generate(engine_url, prompt(5, 4), max_new_tokens=1500, ignore_eos=True, temperature=1.0))
    await asyncio.sleep(0.5)
    status, _ = await post(engine_url, "/abort_request", {"abort_all": True})
    assert status == 200
    out = await asyncio.wait_for(task, 10)
    meta = out["meta_info"]
    assert meta["finish_reason"]["type"] == "abort"
    assert 0 < len(out["output_ids"]) < 1500
    assert len(meta["output_token_logprobs"]) == len(out["output_ids"]) == len(meta["output_token_versions"])


async def test_abort_by_rid_leaves_other_requests_running(engine_url: str) -> None:
    victim = asyncio.create_task(post(engine_url, "/generate", {
        "input_ids": prompt(5, 5), "rid": "victim-1", "sampling_params": {"max_new_tokens": 1500, "ignore_eos": True}}))
    other = asyncio.create_task(generate(engine_url, prompt(5, 6), max_new_tokens=40, ignore_eos=True))
    await asyncio.sleep(0.3)
    await post(engine_url, "/abort_request", {"rid": "victim-1"})
    status, out = await asyncio.wait_for(victim, 10)
    assert status == 200 and out["meta_info"]["finish_reason"]["type"] == "abort"
    assert out["meta_info"]["id"] == "victim-1"
    assert (await other)["meta_info"]["finish_reason"]["type"] == "length"


async def test_stop_token_ids_and_stop_strings(engine_url: str, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    p = prompt(10, 7)
    base = await generate(engine_url, p, temperature=0.0, max_new_tokens=12, ignore_eos=True)
    ids = base["output_ids"]
    stop_id = ids[4]
    first = ids.index(stop_id)
    out = await generate(engine_url, p, temperature=0.0, max_new_tokens=12, ignore_eos=True, stop_token_ids=[stop_id])
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_id}
    assert out["output_ids"] == ids[: first + 1]
    text = tok.decode(ids)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    out = await generate(engine_url, p, temperature=0.0, max_new_tokens=12, ignore_eos=True, stop=[stop])
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert out["text"] == text[: text.index(stop)]
    kept = await generate(engine_url, p, temperature=0.0, max_new_tokens=12, ignore_eos=True, stop=[stop], no_stop_trim=True)
    assert stop in kept["text"]


async def test_prefix_reuse_across_turns_gives_identical_results(engine_url: str, hf_model: Any) -> None:
    turn1 = prompt(30, 8)
    first = await generate(engine_url, turn1, temperature=0.0, max_new_tokens=10, ignore_eos=True)
    turn2 = turn1 + first["output_ids"] + prompt(6, 9)
    second = await generate(engine_url, turn2, temperature=0.9, sampling_seed=5, max_new_tokens=10, ignore_eos=True)
    assert second["meta_info"]["cached_tokens"] >= len(turn1)
    ref = reference_logprobs(hf_model, turn2, second["output_ids"], 0.9)
    got = torch.tensor([t[0] for t in second["meta_info"]["output_token_logprobs"]])
    assert (got - ref).abs().max().item() <= 1e-4


async def test_pause_holds_requests_until_continue(engine_url: str) -> None:
    status, _ = await post(engine_url, "/pause_generation", {"mode": "in_place"})
    assert status == 200
    try:
        task = asyncio.create_task(generate(engine_url, prompt(4, 10), max_new_tokens=5, ignore_eos=True))
        await asyncio.sleep(0.4)
        assert not task.done()
    finally:
        status, _ = await post(engine_url, "/continue_generation", {})
    assert status == 200
    out = await asyncio.wait_for(task, 10)
    assert len(out["output_ids"]) == 5


async def test_pause_in_abort_mode_returns_partial_outputs_at_once(engine_url: str) -> None:
    task = asyncio.create_task(generate(engine_url, prompt(5, 12), max_new_tokens=1500, ignore_eos=True))
    await asyncio.sleep(0.3)
    try:
        status, _ = await post(engine_url, "/pause_generation", {})  # SGLang's default mode: abort
        assert status == 200
        out = await asyncio.wait_for(task, 10)  # answered while the engine stays paused
        assert out["meta_info"]["finish_reason"]["type"] == "abort" and out["output_ids"]
    finally:
        await post(engine_url, "/continue_generation", {})


async def test_streaming_sends_cumulative_chunks_then_done(engine_url: str) -> None:
    body = {"input_ids": prompt(6, 11), "stream": True, "return_logprob": True,
            "sampling_params": {"max_new_tokens": 6, "ignore_eos": True, "temperature": 0.0}}
    chunks = []
    async with aiohttp.ClientSession() as s, s.post(engine_url + "/generate", json=body) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        async for line in r.content:
            if line.startswith(b"data: "):
                chunks.append(line[6:].strip())
    assert chunks[-1] == b"[DONE]"
    import json

    last = json.loads(chunks[-2])
    assert last["meta_info"]["finish_reason"]["type"] == "length" and len(last["output_ids"]) == 6
    full = await generate(engine_url, body["input_ids"], **body["sampling_params"])
    assert last["output_ids"] == full["output_ids"]


async def test_info_endpoints(engine_url: str) -> None:
    async with aiohttp.ClientSession() as s:
        for path in ("/health", "/health_generate", "/flush_cache"):
            async with s.get(engine_url + path) as r:
                assert r.status == 200, path
        async with s.get(engine_url + "/get_model_info") as r:
            info = await r.json()
            assert info["is_generation"] is True and info["model_type"] == "qwen2"
        async with s.get(engine_url + "/get_weight_version") as r:
            assert (await r.json())["weight_version"] == "0"
        async with s.get(engine_url + "/get_server_info") as r:
            state = (await r.json())["internal_states"][0]
            assert state["generated_tokens"] > 0


async def test_heap_is_frozen_at_start_and_by_freeze_gc(engine_url: str) -> None:
    """engine.freeze_gc (default on): the model's objects are out of the collector's generations once the engine
    is up; SGLang's /freeze_gc freezes again, taking in what requests created since."""
    async with aiohttp.ClientSession() as s:

        async def frozen() -> int:
            async with s.get(engine_url + "/get_server_info") as r:
                return int((await r.json())["internal_states"][0]["gc_frozen_objects"])

        at_start = await frozen()
        assert at_start > 10_000  # torch, transformers, the model's modules and parameters
        await generate(engine_url, prompt(8, 3), max_new_tokens=4)
        async with s.post(engine_url + "/freeze_gc") as r:
            assert r.status == 200 and await r.text() == "Garbage collection frozen.\n"
        assert await frozen() >= at_start


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"input_ids": [1, 2], "sampling_params": {"temperature": "hot"}}, "sampling_params.temperature"),
        ({"input_ids": [1, 2], "sampling_params": {"temperature": -1}}, "sampling_params.temperature"),
        ({"input_ids": [1, 2], "sampling_params": {"top_p": 1.5}}, "sampling_params.top_p"),
        ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": -3}}, "sampling_params.max_new_tokens"),
        ({"input_ids": [1, 2], "sampling_params": {"top_k": 0}}, "sampling_params.top_k"),
        ({"input_ids": [1, 2], "sampling_params": {"bogus": 1}}, "sampling_params.bogus"),
        ({"input_ids": [1, 2], "sampling_params": {"n": 0}}, "sampling_params.n"),
        ({"input_ids": [1, 99999]}, "input_ids"),
        ({"input_ids": []}, "input_ids"),
        ({"input_ids": [1] * 5000}, "input_ids"),
        ({"input_ids": "abc"}, "input_ids"),
        ({"sampling_params": {}}, "input_ids"),
    ],
)
async def test_bad_requests_get_400_naming_the_field(engine_url: str, body: dict[str, Any], field: str) -> None:
    status, out = await post(engine_url, "/generate", body)
    assert status == 400, out
    assert out["error"]["param"] == field and field in out["error"]["message"]


async def test_malformed_json_and_bad_control_requests_get_400(engine_url: str) -> None:
    status, out = await post(engine_url, "/generate", None, raw=b"{not json")
    assert status == 400 and "JSON" in out["error"]["message"]
    status, out = await post(engine_url, "/abort_request", {})
    assert status == 400 and out["error"]["param"] == "rid"
    status, out = await post(engine_url, "/update_weights_from_disk", {"model_path": "/nonexistent"})
    assert status == 400 and out["success"] is False and "/nonexistent" in out["message"]
    assert (await generate(engine_url, [1, 2, 3], max_new_tokens=2))["output_ids"]  # still serving


async def test_min_new_tokens_bans_end_tokens_until_reached(engine_url: str, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(tiny_model_dir).eos_token_id
    outs = await asyncio.wait_for(asyncio.gather(*(
        generate(engine_url, [5, 6, 7], temperature=1.0, max_new_tokens=12, min_new_tokens=8, sampling_seed=s,
                 stop_token_ids=[eos])
        for s in range(6)
    )), timeout=60)
    for out in outs:
        assert len(out["output_ids"]) >= 8
        assert eos not in out["output_ids"][:7]
