"""SGLang conformance: logprob fields of /generate.

Behaviour checked (SGLang's test_srt_endpoint logprob tests and run_logprob_check): ``prompt_tokens ==
logprob_start_len + len(input_token_logprobs)`` (and the same for ``input_top_logprobs``); ``top_logprobs_num``
gives that many ``[logprob, id, text]`` entries per output token, and at temperature 0 the top entry equals the
chosen token's triple; ``max_new_tokens: 0`` with ``logprob_start_len: 0`` scores the whole prompt, and scoring
prompt + output reproduces the output logprobs; ``return_text_in_logprobs`` fills the text of input and output
triples (their concatenation is the text); ``token_ids_logprob`` agrees with ``input_token_logprobs``.
Values are checked against one plain forward pass of the model (|diff| <= 1e-4).
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import torch

from tests.conformance.calls import generate

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def forward_logprobs(model: Any, ids: list[int], temperature: float = 1.0) -> torch.Tensor:
    """``[len(ids) - 1, vocab]``: log_softmax(logits / T) predicting tokens 1.. of ``ids``."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits / temperature, dim=-1)


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(5, 500) for _ in range(n)]


@pytest.mark.parametrize(("start", "top"), [(0, 0), (3, 5), (19, 2)])
async def test_prompt_tokens_equal_start_plus_input_logprobs(engine_url: str, start: int, top: int) -> None:
    p = prompt(20, 1)
    out = await generate(engine_url, {"input_ids": p, "return_logprob": True, "logprob_start_len": start,
                                      "top_logprobs_num": top, "sampling_params": {"max_new_tokens": 4, "ignore_eos": True}})
    meta = out["meta_info"]
    assert meta["prompt_tokens"] == start + len(meta["input_token_logprobs"]) == 20
    assert [t[1] for t in meta["input_token_logprobs"]] == p[start:]
    assert len(meta["output_token_logprobs"]) == meta["completion_tokens"] == 4
    if top:
        assert meta["prompt_tokens"] == start + len(meta["input_top_logprobs"])
        assert all(len(t) == top for t in meta["output_top_logprobs"])
    else:
        assert "input_top_logprobs" not in meta and "output_top_logprobs" not in meta


async def test_default_start_reports_the_last_prompt_token(engine_url: str) -> None:
    out = await generate(engine_url, {"input_ids": prompt(9, 2), "return_logprob": True,
                                      "sampling_params": {"max_new_tokens": 2}})
    assert len(out["meta_info"]["input_token_logprobs"]) == 1


async def test_greedy_top_logprob_is_the_chosen_token_and_values_match_a_forward_pass(engine_url: str, hf_model: Any) -> None:
    p = prompt(15, 3)
    out = await generate(engine_url, {"input_ids": p, "return_logprob": True, "top_logprobs_num": 5,
                                      "logprob_start_len": 0,
                                      "sampling_params": {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}})
    meta = out["meta_info"]
    for chosen, top in zip(meta["output_token_logprobs"], meta["output_top_logprobs"], strict=True):
        assert top[0] == chosen and [t[0] for t in top] == sorted((t[0] for t in top), reverse=True)
    ref = forward_logprobs(hf_model, p + out["output_ids"])
    for i, top in enumerate(meta["output_top_logprobs"]):
        want = ref[len(p) - 1 + i].topk(5)
        assert [t[1] for t in top] == want.indices.tolist()
        assert max(abs(t[0] - v) for t, v in zip(top, want.values.tolist(), strict=True)) <= 1e-4
    assert meta["input_top_logprobs"][0] is None  # the first prompt token has no distribution
    for j, top in enumerate(meta["input_top_logprobs"][1:], start=1):
        assert [t[1] for t in top] == ref[j - 1].topk(5).indices.tolist()


async def test_max_new_tokens_zero_scores_the_whole_prompt_and_reproduces_output_logprobs(engine_url: str, hf_model: Any) -> None:
    p = prompt(12, 4)
    gen = await generate(engine_url, {"input_ids": p, "return_logprob": True, "logprob_start_len": 0,
                                      "sampling_params": {"temperature": 1.0, "max_new_tokens": 10, "ignore_eos": True}})
    full = p + gen["output_ids"]
    score = await generate(engine_url, {"input_ids": full, "return_logprob": True, "logprob_start_len": 0,
                                        "sampling_params": {"max_new_tokens": 0}})
    meta = score["meta_info"]
    assert score["output_ids"] == [] and meta["finish_reason"] == {"type": "length", "length": 0}
    assert len(meta["input_token_logprobs"]) == len(full) and meta["input_token_logprobs"][0][0] is None
    scored = torch.tensor([t[0] for t in meta["input_token_logprobs"][len(p):]])
    sampled = torch.tensor([t[0] for t in gen["meta_info"]["output_token_logprobs"]])
    assert (scored - sampled).abs().max().item() <= 1e-4
    ref = forward_logprobs(hf_model, full).gather(-1, torch.tensor(full[1:]).view(-1, 1)).view(-1)
    got = torch.tensor([t[0] for t in meta["input_token_logprobs"][1:]])
    assert (got - ref).abs().max().item() <= 1e-4


async def test_text_in_logprobs_for_input_and_output_tokens(engine_url: str) -> None:
    body = {"text": ["I have a very good idea on", "Today is a sunny day and"], "return_logprob": True,
            "top_logprobs_num": 3, "return_text_in_logprobs": True, "logprob_start_len": 2,
            "sampling_params": {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}}
    out = await generate(engine_url, body)
    for text, res in zip(body["text"], out, strict=True):
        meta = res["meta_info"]
        assert meta["prompt_tokens"] == 2 + len(meta["input_token_logprobs"])
        assert text.endswith("".join(t[2] for t in meta["input_token_logprobs"]))
        assert res["text"] == "".join(t[2] for t in meta["output_token_logprobs"])
        assert all(isinstance(t[2], str) for top in meta["output_top_logprobs"] for t in top)
    plain = await generate(engine_url, {**body, "return_text_in_logprobs": False})
    assert all(t[2] is None for res in plain for t in res["meta_info"]["output_token_logprobs"])


async def test_token_ids_logprob_agrees_with_input_token_logprobs(engine_url: str) -> None:
    p = list(range(5, 125))
    probes = list(range(5, 125, 13))
    out = await generate(engine_url, {"input_ids": p, "return_logprob": True, "logprob_start_len": 0,
                                      "token_ids_logprob": probes,
                                      "sampling_params": {"temperature": 0, "max_new_tokens": 3, "ignore_eos": True}})
    meta = out["meta_info"]
    assert len(meta["input_token_ids_logprobs"]) == len(meta["input_token_logprobs"])
    assert len(meta["output_token_ids_logprobs"]) == 3
    checked = 0
    for (lp, tok, _), probe in zip(meta["input_token_logprobs"], meta["input_token_ids_logprobs"], strict=True):
        if lp is None or tok not in probes:
            continue
        assert abs({t: v for v, t, _ in probe}[tok] - lp) < 1e-5
        checked += 1
    assert checked >= 8


@pytest.fixture(scope="module")
def chunked_engine_url(tiny_model_dir: Path) -> Any:
    """An engine that prefills at most 16 new tokens per pass (SGLang's ``--chunked-prefill-size``)."""
    from tests.fixtures.engine import start_engine

    with start_engine(tiny_model_dir, "--max-running", "4", "--chunked-prefill-size", "16") as url:
        yield url


async def test_logprobs_with_chunked_prefill(chunked_engine_url: str, engine_url: str, hf_model: Any) -> None:
    """SGLang's test_logprob_with_chunked_prefill, at a tiny model's size: prompts of 70 tokens prefilled 16 at a
    time score as one forward pass does, and generate what an engine prefilling them whole generates."""
    prompts = [prompt(70, 10 + i) for i in range(3)]
    body = {"return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 3,
            "sampling_params": {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}}
    chunked = await generate(chunked_engine_url, {**body, "input_ids": prompts})
    whole = await generate(engine_url, {**body, "input_ids": prompts})
    for p, res, ref_res in zip(prompts, chunked, whole, strict=True):
        meta = res["meta_info"]
        assert res["output_ids"] == ref_res["output_ids"]
        assert len(meta["input_token_logprobs"]) == len(p) and len(meta["input_top_logprobs"]) == len(p)
        ref = forward_logprobs(hf_model, p)
        got = torch.tensor([t[0] for t in meta["input_token_logprobs"][1:]])
        assert (got - ref.gather(-1, torch.tensor(p[1:]).view(-1, 1)).view(-1)).abs().max().item() <= 1e-4
        assert [[t[1] for t in top] for top in meta["input_top_logprobs"][1:]] == ref.topk(3).indices.tolist()


async def test_long_prompts_prefilled_between_decode_steps_generate_as_prefilled_whole(
    chunked_engine_url: str, engine_url: str
) -> None:
    """Without prompt logprobs a prompt over the budget is fed a piece per scheduler iteration while the other
    requests decode: the outputs and their logprobs are those of an engine that prefills it in one pass."""
    long = [prompt(n, 20 + i) for i, n in enumerate((65, 70, 66))]  # 65: one token left after whole pieces
    body = {"return_logprob": True, "sampling_params": {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}}
    running = asyncio.ensure_future(generate(chunked_engine_url, {**body, "input_ids": [prompt(8, 5)]}))
    chunked = await generate(chunked_engine_url, {**body, "input_ids": long})
    await running
    whole = await generate(engine_url, {**body, "input_ids": long})
    for res, ref in zip(chunked, whole, strict=True):
        assert res["output_ids"] == ref["output_ids"]
        got = [t[0] for t in res["meta_info"]["output_token_logprobs"]]
        want = [t[0] for t in ref["meta_info"]["output_token_logprobs"]]
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= 1e-4
        (lp, tok, _), (ref_lp, ref_tok, _) = res["meta_info"]["input_token_logprobs"][-1], \
            ref["meta_info"]["input_token_logprobs"][-1]  # the last prompt token's (logprob_start_len -1)
        assert tok == ref_tok and abs(lp - ref_lp) <= 1e-4
    async with aiohttp.ClientSession() as s, s.get(f"{chunked_engine_url}/get_server_info") as r:
        info = await r.json()
    assert info["internal_states"][0]["prefill_pieces"] >= 3 * 4  # 16 a piece up to the scored last token
