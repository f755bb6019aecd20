"""Fuzzing the engine's HTTP API with hypothesis (issue 17): whatever the body, never a 500, never a dead engine.

Bodies mix SGLang's real field names with values of any JSON type (and some plausible ones, so requests also
get past validation and run); raw bodies cover broken and deeply nested JSON. Every answer must be a 2xx or a
4xx/429/503 with a JSON error, and ``/health_generate`` must still work afterwards. Bounded: a few hundred
examples in total, tokens per request capped small.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
TOKEN_IDS = st.lists(st.integers(min_value=-3, max_value=600), min_size=0, max_size=12)
SMALL = st.integers(min_value=-2, max_value=6)

SAMPLING = st.fixed_dictionaries({}, optional={
    "temperature": st.floats(min_value=-1, max_value=3) | JSON,
    "top_p": st.floats(min_value=-0.5, max_value=1.5) | JSON,
    "top_k": SMALL | JSON,
    "min_p": st.floats(min_value=-1, max_value=2),
    "max_new_tokens": SMALL,
    "min_new_tokens": SMALL,
    "n": st.integers(min_value=-1, max_value=3),
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=3) | JSON,
    "stop_token_ids": TOKEN_IDS | JSON,
    "ignore_eos": st.booleans() | JSON,
    "sampling_seed": st.integers(min_value=-(2**65), max_value=2**65),
    "logit_bias": st.dictionaries(st.text(max_size=6) | st.integers(0, 600).map(str), st.floats(-200, 200), max_size=3)
    | JSON,
    "frequency_penalty": st.floats(-3, 3), "presence_penalty": st.floats(-3, 3),
    "repetition_penalty": st.floats(-1, 3),
    "regex": st.sampled_from(["( Yes| No)", "(", "[a-c]{1,3}", "x*"]) | JSON,
    "json_schema": st.sampled_from(['{"type": "integer"}', "{", '{"type": 1}', "$$ANY$$"]) | JSON,
    "ebnf": st.sampled_from(['root ::= "a" | "b"', "root ::="]) | JSON,
    "custom_params": JSON,
    "stream_interval": SMALL,
    "bogus": JSON,
})

GENERATE = st.fixed_dictionaries({}, optional={
    "text": st.text(max_size=30) | st.lists(st.text(max_size=10), max_size=3) | JSON,
    "input_ids": TOKEN_IDS | st.lists(TOKEN_IDS, max_size=3) | JSON,
    "sampling_params": SAMPLING | st.lists(SAMPLING, max_size=3) | JSON,
    "rid": st.text(max_size=6) | st.lists(st.text(max_size=4), max_size=3) | JSON,
    "return_logprob": st.booleans() | st.lists(st.booleans(), max_size=3) | JSON,
    "logprob_start_len": SMALL | JSON,
    "top_logprobs_num": SMALL | JSON,
    "token_ids_logprob": TOKEN_IDS | JSON,
    "return_text_in_logprobs": st.booleans() | JSON,
    "stream": st.booleans(),
    "custom_logit_processor": JSON,
    "lora_path": JSON, "image_data": JSON, "session_params": JSON,
})

VALID_SAMPLING = st.fixed_dictionaries({"max_new_tokens": st.integers(0, 6)}, optional={
    "temperature": st.floats(0, 2), "top_p": st.floats(0.05, 1), "top_k": st.sampled_from([-1, 1, 5]),
    "n": st.integers(1, 3), "ignore_eos": st.booleans(), "stop": st.text(min_size=1, max_size=2),
    "logit_bias": st.dictionaries(st.integers(0, 511).map(str), st.floats(-50, 50), max_size=2),
    "frequency_penalty": st.floats(-2, 2), "repetition_penalty": st.floats(0.5, 2),
    "regex": st.sampled_from(["( Yes| No)", "[a-c]{1,3}"]), "min_new_tokens": st.integers(0, 3),
})
PLAUSIBLE = st.fixed_dictionaries(
    {"input_ids": st.lists(st.integers(0, 511), min_size=1, max_size=10) | st.lists(
        st.lists(st.integers(0, 511), min_size=1, max_size=6), min_size=1, max_size=3),
     "sampling_params": VALID_SAMPLING},
    optional={"return_logprob": st.booleans(), "logprob_start_len": st.integers(-1, 1), "top_logprobs_num": st.integers(0, 3),
              "token_ids_logprob": st.lists(st.integers(0, 511), max_size=3), "return_text_in_logprobs": st.booleans(),
              "stream": st.booleans(), "rid": st.text(min_size=1, max_size=6)},
)

CONTROL = st.sampled_from([
    "/abort_request", "/update_weights_from_disk", "/update_weights_from_tensor", "/tokenize", "/v1/tokenize",
    "/detokenize", "/pause_generation", "/continue_generation", "/release_memory_occupation",
    "/resume_memory_occupation", "/flush_cache", "/v1/completions", "/v1/chat/completions",
])
CONTROL_BODY = st.fixed_dictionaries({}, optional={
    "rid": JSON, "abort_all": JSON, "model_path": st.sampled_from(["", "/", "/nonexistent", "."]) | JSON,
    "weight_version": JSON, "serialized_named_tensors": st.lists(st.text(max_size=20), max_size=2) | JSON,
    "prompt": JSON, "messages": JSON, "tools": JSON, "tokens": TOKEN_IDS | JSON, "mode": JSON, "tags": JSON,
    "max_tokens": SMALL, "temperature": JSON, "logprobs": JSON, "top_logprobs": JSON,
})

# the fixture only cleans up after the whole test: each example restores what it changed itself
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def send(url: str, path: str, data: bytes) -> tuple[int, bytes]:
    req = urllib.request.Request(url + path, data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def check(status: int, body: bytes) -> None:
    assert status < 500 or status == 503, (status, body[:300])
    if status >= 400 and body.startswith(b"{"):
        err = json.loads(body)
        assert "error" in err or "message" in err or err.get("object") == "error", err


@pytest.fixture
def url(engine_url: str) -> Iterator[str]:
    yield engine_url
    for path in ("/continue_generation", "/resume_memory_occupation"):  # whatever the fuzz left behind
        send(engine_url, path, b"{}")
    assert send(engine_url, "/abort_request", b'{"abort_all": true}')[0] == 200


@FUZZ
@given(body=GENERATE | PLAUSIBLE)
def test_generate_never_fails_with_500(url: str, body: dict[str, Any]) -> None:
    status, raw = send(url, "/generate", json.dumps(body).encode())
    check(status, raw)
    if status == 200 and not body.get("stream"):
        reply = json.loads(raw)
        for one in reply if isinstance(reply, list) else [reply]:
            assert "meta_info" in one and "output_ids" in one


@FUZZ
@given(path=CONTROL, body=CONTROL_BODY)
def test_control_and_tokenizer_endpoints_never_fail_with_500(url: str, path: str, body: dict[str, Any]) -> None:
    check(*send(url, path, json.dumps(body).encode()))
    if path in ("/pause_generation", "/release_memory_occupation"):
        restore = "/continue_generation" if path == "/pause_generation" else "/resume_memory_occupation"
        assert send(url, restore, b"{}")[0] == 200


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=64) | st.integers(1, 20000).map(lambda d: b"[" * d + b"]" * d)
       | st.integers(1, 20000).map(lambda d: b'{"input_ids":' + b"[" * d + b"1" + b"]" * d + b"}"))
def test_broken_and_deeply_nested_json_is_a_400(url: str, raw: bytes) -> None:
    for path in ("/generate", "/abort_request", "/tokenize", "/v1/chat/completions"):
        check(*send(url, path, raw))


def test_the_engine_still_generates_after_fuzzing(engine_url: str) -> None:
    with urllib.request.urlopen(engine_url + "/health_generate", timeout=60) as resp:
        assert resp.status == 200
