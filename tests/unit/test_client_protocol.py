"""Pure request building / response parsing of the engine client, on SGLang's real response shapes."""

from __future__ import annotations

import numpy as np
import pytest

from agentrl.client.protocol import (
    build_abort_request,
    build_generate_request,
    build_update_weights_request,
    error_for_status,
    parse_generate_response,
    parse_weight_version,
)
from agentrl.errors import EngineError, EngineRequestError, EngineUnavailable
from agentrl.messages import SamplingParams

# what a real SGLang server answers to /generate with return_logprob (no output_token_versions)
SGLANG_REPLY = {
    "text": " Paris.",
    "output_ids": [12366, 13, 151645],
    "meta_info": {
        "id": "abc",
        "finish_reason": {"type": "stop", "matched": 151645},
        "prompt_tokens": 9,
        "completion_tokens": 3,
        "cached_tokens": 0,
        "weight_version": "default",
        "output_token_logprobs": [[-0.5, 12366, None], [-0.25, 13, None], [-0.125, 151645, None]],
        "e2e_latency": 0.1,
    },
}


def test_generate_request_carries_tokens_sampling_and_rid() -> None:
    body = build_generate_request(np.array([1, 2, 3], dtype=np.int32), SamplingParams(temperature=0.5, stop=["\n"]), rid="r1")
    assert body["input_ids"] == [1, 2, 3] and all(type(t) is int for t in body["input_ids"])
    assert body["sampling_params"]["temperature"] == 0.5 and body["sampling_params"]["stop"] == ["\n"]
    assert "sampling_seed" not in body["sampling_params"]  # None values are left out
    assert body["return_logprob"] is True and body["rid"] == "r1" and body["stream"] is False


def test_control_request_bodies() -> None:
    assert build_abort_request(None) == {"abort_all": True}
    assert build_abort_request("r") == {"rid": "r"}
    assert build_update_weights_request("/w", 3) == {"model_path": "/w", "weight_version": "3"}


def test_parse_real_sglang_reply_fills_versions_with_weight_version() -> None:
    out = parse_generate_response(SGLANG_REPLY, engine_id="e0")
    assert out.output_ids.tolist() == [12366, 13, 151645]
    assert out.logprobs.tolist() == [-0.5, -0.25, -0.125]
    assert out.versions.tolist() == [0, 0, 0] and out.weight_version == 0
    assert out.finish_reason == "stop" and out.matched_stop == 151645
    assert out.prompt_tokens == 9 and out.rid == "abc" and out.engine_id == "e0" and out.text == " Paris."


def test_parse_embedded_reply_uses_per_token_versions() -> None:
    meta = {**SGLANG_REPLY["meta_info"], "weight_version": "4", "output_token_versions": [3, 3, 4]}  # type: ignore[dict-item]
    out = parse_generate_response({**SGLANG_REPLY, "meta_info": meta})
    assert out.versions.tolist() == [3, 3, 4] and out.weight_version == 4


def test_parse_length_abort_and_string_matches() -> None:
    for reason, finish, matched in [
        ({"type": "length", "length": 3}, "length", None),
        ({"type": "abort", "message": "x"}, "abort", None),
        ({"type": "stop", "matched": "</answer>"}, "stop", "</answer>"),
    ]:
        meta = {**SGLANG_REPLY["meta_info"], "finish_reason": reason}  # type: ignore[dict-item]
        out = parse_generate_response({**SGLANG_REPLY, "meta_info": meta})
        assert (out.finish_reason, out.matched_stop) == (finish, matched)


def test_parse_without_logprobs_gives_nan_and_without_output_ids_uses_triples() -> None:
    meta = {k: v for k, v in SGLANG_REPLY["meta_info"].items() if k != "output_token_logprobs"}  # type: ignore[union-attr]
    out = parse_generate_response({**SGLANG_REPLY, "meta_info": meta})
    assert np.isnan(out.logprobs).all() and len(out.logprobs) == 3
    no_ids = {k: v for k, v in SGLANG_REPLY.items() if k != "output_ids"}
    assert parse_generate_response(no_ids).output_ids.tolist() == [12366, 13, 151645]


@pytest.mark.parametrize(
    "payload",
    [
        None,
        {"text": "x"},
        {"output_ids": [1], "meta_info": {"finish_reason": {"type": "weird"}}},
        {"output_ids": [1, 2], "meta_info": {"finish_reason": {"type": "length"}, "output_token_logprobs": [[-1.0, 1, None]]}},
        {"meta_info": {"finish_reason": {"type": "length"}}},
    ],
)
def test_malformed_replies_raise_engine_error(payload: object) -> None:
    with pytest.raises(EngineError):
        parse_generate_response(payload, engine_id="e1")


def test_weight_version_parsing() -> None:
    assert parse_weight_version("12") == 12 and parse_weight_version(3) == 3
    assert parse_weight_version("default") == 0 and parse_weight_version(None) == 0


def test_status_mapping_retryable_vs_request_errors() -> None:
    assert isinstance(error_for_status(503, "down", "e"), EngineUnavailable)
    assert isinstance(error_for_status(429, {"error": {"message": "busy"}}, "e"), EngineUnavailable)
    err = error_for_status(400, {"error": {"message": "sampling_params.top_p: bad"}}, "e")
    assert isinstance(err, EngineRequestError) and err.status == 400 and "top_p" in str(err)


def test_auth_headers_send_the_admin_key_only_to_admin_endpoints() -> None:
    from agentrl.client.protocol import auth_headers

    assert auth_headers("/generate", None, None) == {}
    assert auth_headers("/generate", "api", "admin") == {"Authorization": "Bearer api"}
    assert auth_headers("/abort_request", "api", "admin") == {"Authorization": "Bearer admin"}
    assert auth_headers("/update_weights_from_disk", "api", None) == {"Authorization": "Bearer api"}
    assert auth_headers("/generate", None, "admin") == {}


def test_resolve_key_prefers_config_then_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from agentrl.client.protocol import ADMIN_KEY_ENV, resolve_key

    monkeypatch.setenv(ADMIN_KEY_ENV, "from-env")
    assert resolve_key(None, ADMIN_KEY_ENV) == "from-env" and resolve_key("set", ADMIN_KEY_ENV) == "set"
    assert resolve_key("", ADMIN_KEY_ENV) is None
    monkeypatch.delenv(ADMIN_KEY_ENV)
    assert resolve_key(None, ADMIN_KEY_ENV) is None


def test_memory_and_tensor_bodies_round_trip_through_the_engines_decoder() -> None:
    import torch
    import torch.multiprocessing as mp

    from agentrl.client.protocol import build_memory_request, build_update_weights_from_tensor_request
    from agentrl.engine.tensor_weights import decode_named_tensors

    assert build_memory_request() == {} and build_memory_request(["kv_cache"]) == {"tags": ["kv_cache"]}
    strategy = mp.get_sharing_strategy()
    mp.set_sharing_strategy("file_system")
    try:
        tensors = [("a.weight", torch.arange(6.0).view(2, 3)), ("b", torch.ones(2, dtype=torch.bfloat16))]
        body = build_update_weights_from_tensor_request(tensors, 4)
        assert body["weight_version"] == "4" and len(body["serialized_named_tensors"]) == 1
        back = decode_named_tensors(body["serialized_named_tensors"][0])
    finally:
        mp.set_sharing_strategy(strategy)
    assert [n for n, _ in back] == ["a.weight", "b"]
    assert all(torch.equal(t, u) and t.dtype == u.dtype for (_, t), (_, u) in zip(back, tensors, strict=True))
