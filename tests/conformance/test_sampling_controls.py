"""SGLang conformance: constrained decoding, logit_bias, penalties and custom logit processors.

Behaviour checked (SGLang's test_srt_endpoint): ``regex`` / ``json_schema`` / ``ebnf`` restrict the output to
the grammar and the grammar shapes the reported top logprobs (``test_logprob_grammar``); a +100
``logit_bias`` forces a token, -100 forbids it, and only for its own request (``test_logit_bias*``,
``test_forbidden_token``); a ``custom_logit_processor`` (dill-serialized class, server flag required) with
``custom_params`` decides every token of its own request only (``test_custom_logit_processor*``). What the
engine cannot do is a 400 naming the field: a bad grammar, two grammars, bad bias keys, a processor on an
engine without the flag.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conformance.calls import generate, post
from tests.fixtures.engine import start_engine


@pytest.fixture(scope="module")
def processor_engine(tiny_model_dir: Path) -> Iterator[str]:
    with start_engine(tiny_model_dir, "--set", "engine.enable_custom_logit_processor=true") as url:
        yield url


def force_token_processor() -> str:
    """SGLang's wire format for a processor class: {"callable": hex(dill.dumps(cls))}."""
    import dill

    class ForceToken:
        def __call__(self, logits: Any, custom_param_list: list[dict[str, Any]]) -> Any:
            assert logits.shape[0] == len(custom_param_list)
            for i, params in enumerate(custom_param_list):
                logits[i, :] = -float("inf")
                logits[i, params["token_id"]] = 0.0
            return logits

    return json.dumps({"callable": dill.dumps(ForceToken, recurse=True).hex()})


async def test_regex_allows_only_matching_outputs_and_shapes_top_logprobs(engine_url: str) -> None:
    outs = await asyncio.gather(*(generate(engine_url, {
        "text": "Question: Is Paris the capital of France? Answer:", "return_logprob": True, "top_logprobs_num": 5,
        "return_text_in_logprobs": True,
        "sampling_params": {"temperature": 1.0, "max_new_tokens": 8, "regex": "( Yes| No)", "sampling_seed": s},
    }) for s in range(6)))
    for out in outs:
        assert out["text"] in (" Yes", " No") and out["meta_info"]["finish_reason"]["type"] == "stop"
        first = out["meta_info"]["output_top_logprobs"][0]
        allowed = [t for t in first if t[0] is not None and t[0] > -1e30]
        assert allowed and all(" Yes".startswith(t[2]) or " No".startswith(t[2]) for t in allowed), first


async def test_json_schema_outputs_parse_and_follow_the_schema(engine_url: str) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}, "ok": {"type": "boolean"}},
              "required": ["answer", "ok"], "additionalProperties": False}
    outs = await asyncio.gather(*(generate(engine_url, {
        "input_ids": [5, 6, 7],
        "sampling_params": {"temperature": 1.0, "max_new_tokens": 200, "sampling_seed": s,
                            "json_schema": json.dumps(schema)},
    }) for s in range(6)))
    finished = [o for o in outs if o["meta_info"]["finish_reason"]["type"] == "stop"]
    assert len(finished) >= 4
    for o in finished:
        value = json.loads(o["text"])
        assert set(value) == {"answer", "ok"} and isinstance(value["answer"], int) and isinstance(value["ok"], bool)


async def test_ebnf_grammar(engine_url: str) -> None:
    outs = await asyncio.gather(*(generate(engine_url, {
        "input_ids": [9, 10], "sampling_params": {"temperature": 1.0, "max_new_tokens": 20, "sampling_seed": s,
                                                  "ebnf": 'root ::= "yes" | "no" | "maybe"'},
    }) for s in range(5)))
    assert {o["text"] for o in outs} <= {"yes", "no", "maybe"}


@pytest.mark.parametrize(("sampling", "field"), [
    ({"regex": "("}, "sampling_params.regex"),
    ({"json_schema": "{not json"}, "sampling_params.json_schema"),
    ({"json_schema": '{"type": 12}'}, "sampling_params.json_schema"),
    ({"ebnf": "root ::= "}, "sampling_params.ebnf"),
    ({"regex": "a", "ebnf": 'root ::= "a"'}, "sampling_params.ebnf"),
    ({"logit_bias": {"abc": 1.0}}, "sampling_params.logit_bias"),
    ({"logit_bias": {"99999": 1.0}}, "sampling_params.logit_bias"),
    ({"logit_bias": {"-1": 1.0}}, "sampling_params.logit_bias"),
    ({"frequency_penalty": 3.0}, "sampling_params.frequency_penalty"),
    ({"repetition_penalty": 0.0}, "sampling_params.repetition_penalty"),
    ({"custom_params": {"x": 1}}, "sampling_params.custom_params"),
])
async def test_what_cannot_be_done_is_a_400_naming_the_field(engine_url: str, sampling: dict[str, Any], field: str) -> None:
    status, out = await post(engine_url, "/generate", {"input_ids": [5, 6], "sampling_params": sampling})
    assert status == 400 and out["error"]["param"] == field, out


async def test_logit_bias_forces_and_forbids_tokens_per_request(engine_url: str) -> None:
    forced, free = await asyncio.gather(
        generate(engine_url, {"input_ids": [5, 6, 7], "sampling_params": {"temperature": 1.0, "max_new_tokens": 6,
                                                                           "ignore_eos": True, "logit_bias": {"60": 100.0}}}),
        generate(engine_url, {"input_ids": [5, 6, 7], "sampling_params": {"temperature": 1.0, "max_new_tokens": 6,
                                                                           "ignore_eos": True, "sampling_seed": 1}}),
    )
    assert forced["output_ids"] == [60] * 6 and any(t != 60 for t in free["output_ids"])
    greedy = await generate(engine_url, {"input_ids": [5, 6, 7], "sampling_params": {
        "temperature": 0, "max_new_tokens": 12, "ignore_eos": True}})
    banned = greedy["output_ids"][0]
    out = await generate(engine_url, {"input_ids": [5, 6, 7], "sampling_params": {
        "temperature": 0, "max_new_tokens": 12, "ignore_eos": True, "logit_bias": {str(banned): -100.0}}})
    assert banned not in out["output_ids"]


async def test_frequency_penalty_stops_repetition(engine_url: str) -> None:
    base = {"temperature": 0, "max_new_tokens": 40, "ignore_eos": True}
    plain = await generate(engine_url, {"input_ids": [5, 6, 7], "sampling_params": base})
    penalized = await generate(engine_url, {"input_ids": [5, 6, 7], "sampling_params": {**base, "frequency_penalty": 2.0,
                                                                                        "presence_penalty": 2.0}})
    assert len(set(penalized["output_ids"])) > len(set(plain["output_ids"]))


async def test_custom_logit_processor_needs_the_server_flag(engine_url: str) -> None:
    status, out = await post(engine_url, "/generate", {"input_ids": [5, 6], "custom_logit_processor": force_token_processor(),
                                                       "sampling_params": {"custom_params": {"token_id": 5}}})
    assert status == 400 and out["error"]["param"] == "custom_logit_processor"


async def test_custom_logit_processor_decides_every_token_of_its_own_request(processor_engine: str) -> None:
    processor = force_token_processor()

    async def run(target: int | None) -> list[int]:
        body: dict[str, Any] = {"input_ids": [5, 6, 7], "return_logprob": True,
                                "sampling_params": {"temperature": 0.0, "max_new_tokens": 6, "ignore_eos": True}}
        if target is not None:
            body["custom_logit_processor"] = processor
            body["sampling_params"]["custom_params"] = {"token_id": target}
        out = await generate(processor_engine, body)
        return [t[1] for t in out["meta_info"]["output_token_logprobs"]]

    targets: list[int | None] = [*range(20, 36), None, None, None, None]
    results = await asyncio.gather(*(run(t) for t in targets))
    plain = results[-1]
    for target, tokens in zip(targets, results, strict=True):
        assert tokens == ([target] * 6 if target is not None else plain)
    status, out = await post(processor_engine, "/generate", {"input_ids": [5], "custom_logit_processor": "{not json"})
    assert status == 400 and out["error"]["param"] == "custom_logit_processor"
