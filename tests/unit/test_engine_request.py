"""Request stop conditions, text trimming and the SGLang reply shape; body validation naming fields."""

from __future__ import annotations

import pytest

from agentrl.engine.api import BadRequest, GenerateIn, SamplingIn, decode_body, to_options
from agentrl.engine.request import Request, RequestOptions


class CharTokenizer:
    """Token i decodes to chr(ord('a') + i); token 0 is special."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join("" if (i == 0 and skip_special_tokens) else chr(ord("a") + i) for i in ids)


def run(req: Request, tokens: list[int], eos: frozenset[int] = frozenset({0})) -> dict | None:  # type: ignore[type-arg]
    reason = None
    for t in tokens:
        req.append(t, -1.0, 0)
        reason = req.check_stop(eos, CharTokenizer())
        if reason:
            req.finish(reason)
            break
    return reason


def test_length_eos_stop_ids_and_min_new_tokens() -> None:
    assert run(Request("r", [1], RequestOptions(max_new_tokens=3)), [1, 2, 3, 4]) == {"type": "length", "length": 3}
    assert run(Request("r", [1], RequestOptions()), [1, 0]) == {"type": "stop", "matched": 0}
    assert run(Request("r", [1], RequestOptions(ignore_eos=True, max_new_tokens=4)), [0, 0, 0, 0])["type"] == "length"  # type: ignore[index]
    assert run(Request("r", [1], RequestOptions(stop_token_ids=[5])), [1, 5]) == {"type": "stop", "matched": 5}
    assert run(Request("r", [1], RequestOptions(min_new_tokens=3, max_new_tokens=5)), [0, 1, 0]) == {"type": "stop", "matched": 0}


def test_stop_strings_trim_text_unless_no_stop_trim() -> None:
    req = Request("r", [1], RequestOptions(stop=["cd"]))
    assert run(req, [1, 2, 3, 4]) == {"type": "stop", "matched": "cd"}
    assert req.text(CharTokenizer()) == "b" and req.output_ids == [1, 2, 3]
    kept = Request("r", [1], RequestOptions(stop=["cd"], no_stop_trim=True))
    run(kept, [1, 2, 3])
    assert kept.text(CharTokenizer()) == "bcd"


def test_reply_has_sglang_shape_with_versions() -> None:
    req = Request("rid-1", [1, 2], RequestOptions(max_new_tokens=2), return_logprob=True)
    run(req, [3, 4])
    out = req.reply(CharTokenizer(), weight_version=5)
    meta = out["meta_info"]
    assert out["output_ids"] == [3, 4] and out["text"] == "de"
    assert meta["output_token_logprobs"] == [[-1.0, 3, None], [-1.0, 4, None]]
    assert meta["finish_reason"] == {"type": "length", "length": 2} and meta["weight_version"] == "5"
    assert meta["output_token_versions"] == [0, 0] and meta["prompt_tokens"] == 2 and meta["id"] == "rid-1"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"sampling_params": {"temperature": "x"}}', "sampling_params.temperature"),
        (b'{"sampling_params": {"unknown_knob": 1}}', "sampling_params.unknown_knob"),
        (b'{"input_ids": [1, "a"]}', "input_ids[1]"),
        (b'{"return_logprob": 3}', "return_logprob"),
    ],
)
def test_decode_body_names_the_field(body: bytes, field: str) -> None:
    with pytest.raises(BadRequest) as info:
        decode_body(body, GenerateIn)
    assert info.value.field == field and field in str(info.value)


def test_options_clamp_to_room_and_reject_top_k_zero() -> None:
    opts = to_options(SamplingIn(max_new_tokens=500, sampling_seed=3), vocab_size=10, room=20)
    assert opts.max_new_tokens == 20 and opts.seed == 3
    with pytest.raises(BadRequest, match="top_k"):
        to_options(SamplingIn(top_k=0), vocab_size=10, room=5)
    with pytest.raises(BadRequest, match="stop_token_ids"):
        to_options(SamplingIn(stop_token_ids=[10]), vocab_size=10, room=5)
