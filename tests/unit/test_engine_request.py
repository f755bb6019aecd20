"""Request stop conditions, text trimming and the SGLang reply shape; body validation naming fields; the
normalization of batched / ``n`` requests into one item per sample."""

from __future__ import annotations

from typing import Any

import pytest

from agentrl.engine.api import BadRequest, SamplingIn, check_tokens, decode_body, to_options
from agentrl.engine.generate_in import GenerateIn, normalize
from agentrl.engine.request import LogprobSpec, Request, RequestOptions


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


def test_reply_with_top_and_chosen_id_logprobs_and_text() -> None:
    spec = LogprobSpec(start=1, top_k=2, token_ids=[5], text=True)
    req = Request("r", [1, 2, 3], RequestOptions(max_new_tokens=1), return_logprob=True, logprobs_spec=spec)
    req.set_prompt_scores([-0.5, -0.25], [[(-0.1, 7), (-0.2, 8)], [(-0.3, 9), (-0.4, 1)]], [[-2.0], [-3.0]])
    run(req, [4])
    req.output_scores.top.append([(-1.0, 4), (-1.5, 6)])
    req.output_scores.ids.append([-4.0])
    meta = req.reply(CharTokenizer(), 0)["meta_info"]
    assert meta["input_token_logprobs"] == [[-0.5, 2, "c"], [-0.25, 3, "d"]]
    assert meta["input_top_logprobs"] == [[[-0.1, 7, "h"], [-0.2, 8, "i"]], [[-0.3, 9, "j"], [-0.4, 1, "b"]]]
    assert meta["input_token_ids_logprobs"] == [[[-2.0, 5, "f"]], [[-3.0, 5, "f"]]]
    assert meta["output_token_logprobs"] == [[-1.0, 4, "e"]] and meta["output_top_logprobs"] == [[[-1.0, 4, "e"], [-1.5, 6, "g"]]]
    assert meta["output_token_ids_logprobs"] == [[[-4.0, 5, "f"]]]


def items(body: dict[str, Any]) -> tuple[list[Any], bool]:
    import msgspec

    return normalize(decode_body(msgspec.json.encode(body), GenerateIn))


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"input_ids": [1], "sampling_params": {"temperature": "x"}}, "sampling_params.temperature"),
        ({"input_ids": [1], "sampling_params": {"unknown_knob": 1}}, "sampling_params.unknown_knob"),
        ({"input_ids": [[1], [2]], "sampling_params": [{}, {"top_p": 7}]}, "sampling_params[1].top_p"),
        ({"input_ids": [1], "return_logprob": 3}, "return_logprob"),
        ({"input_ids": [1], "sampling_params": [{}]}, "sampling_params"),
        ({"input_ids": [1], "image_data": "x.png"}, "image_data"),
        ({"input_ids": [1], "lora_path": "adapter"}, "lora_path"),
        ({"input_ids": [1], "text": "a"}, "text"),
        ({}, "input_ids"),
        ({"input_ids": [[1], 2]}, "input_ids[1]"),
        ({"input_ids": [[1], [2]], "rid": ["a"]}, "rid"),
        ({"input_ids": [[1], [2]], "rid": ["a", "a"]}, "rid"),
        ({"input_ids": [[1], [2]], "top_logprobs_num": [1, 2], "sampling_params": {"n": 2}}, "top_logprobs_num"),
        ({"input_ids": [[1], [2]], "sampling_params": [{"n": 1}, {"n": 2}]}, "sampling_params"),
    ],
)
def test_bad_bodies_name_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(BadRequest) as info:
        items(body)
    assert info.value.field == field and field in str(info.value)


def test_batches_and_n_expand_prompt_major_with_numbered_rids() -> None:
    out, single = items({"input_ids": [[1, 2], [3]], "rid": "b", "return_logprob": [True, False],
                         "sampling_params": [{"temperature": 0}, {"temperature": 1}]})
    assert not single and [i.rid for i in out] == ["b_0", "b_1"] and [i.return_logprob for i in out] == [True, False]
    assert [i.sampling.temperature for i in out] == [0, 1] and [i.prompt_field for i in out] == ["input_ids[0]", "input_ids[1]"]
    out, single = items({"text": ["x", "y"], "rid": ["p", "q"], "sampling_params": {"n": 2}})
    assert not single and [(i.text, i.rid) for i in out] == [("x", "p_0"), ("x", "p_1"), ("y", "q_0"), ("y", "q_1")]
    out, single = items({"input_ids": [4, 5], "rid": "one"})
    assert single and len(out) == 1 and out[0].rid == "one" and out[0].logprob_start_len == -1


def test_token_ids_are_checked_against_the_vocab() -> None:
    assert check_tokens([0, 9], "input_ids", 10) == [0, 9]
    for bad in ([10], [-1], [2**64], [1.0], [True], "12"):
        with pytest.raises(BadRequest, match="input_ids"):
            check_tokens(bad, "input_ids", 10)


def test_options_clamp_to_room_and_reject_top_k_zero() -> None:
    opts = to_options(SamplingIn(max_new_tokens=500, sampling_seed=3), vocab_size=10, room=20)
    assert opts.max_new_tokens == 20 and opts.seed == 3
    with pytest.raises(BadRequest, match="top_k"):
        to_options(SamplingIn(top_k=0), vocab_size=10, room=5)
    with pytest.raises(BadRequest, match="stop_token_ids"):
        to_options(SamplingIn(stop_token_ids=[10]), vocab_size=10, room=5)
    bias = to_options(SamplingIn(logit_bias={"3": 2.5}), vocab_size=10, room=5).logit_bias
    assert bias == {3: 2.5}
    for key in ("x", "10", "-1", " 3 4", "1e3"):
        with pytest.raises(BadRequest, match="logit_bias"):
            to_options(SamplingIn(logit_bias={key: 1.0}), vocab_size=10, room=5)
