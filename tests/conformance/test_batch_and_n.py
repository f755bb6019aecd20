"""SGLang conformance: batched /generate (lists of text / input_ids / rid) and ``sampling_params.n``.

Behaviour checked (SGLang's io_struct normalization and tokenizer manager): a list prompt gives a list reply
in order; ``n`` samples of one prompt are expanded prompt-major and share the prompt's prefix through the
cache; a string rid becomes ``rid_i`` in a batch; list-valued params cannot be combined with ``n > 1``;
duplicate rids are a 400 naming "Duplicate request ID"; streamed batches carry ``index``.
"""

from __future__ import annotations

import random

from tests.conformance.calls import generate, post, stream


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(5, 500) for _ in range(n)]


GREEDY = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}


async def test_a_batch_of_input_ids_gives_one_reply_per_prompt_in_order(engine_url: str) -> None:
    prompts = [prompt(8, 1), prompt(12, 2), prompt(5, 3)]
    out = await generate(engine_url, {"input_ids": prompts, "sampling_params": GREEDY})
    assert isinstance(out, list) and len(out) == 3
    for p, reply in zip(prompts, out, strict=True):
        alone = await generate(engine_url, {"input_ids": p, "sampling_params": GREEDY})
        assert reply["output_ids"] == alone["output_ids"] and reply["meta_info"]["prompt_tokens"] == len(p)


async def test_a_batch_of_texts_with_per_prompt_sampling_params(engine_url: str) -> None:
    body = {"text": ["What is 2 + 2?", "The answer is"], "rid": ["batch-a", "batch-b"],
            "sampling_params": [{**GREEDY, "max_new_tokens": 3}, {**GREEDY, "max_new_tokens": 5}]}
    out = await generate(engine_url, body)
    assert [o["meta_info"]["id"] for o in out] == ["batch-a", "batch-b"]
    assert [o["meta_info"]["completion_tokens"] for o in out] == [3, 5]


async def test_a_string_rid_is_numbered_across_a_batch(engine_url: str) -> None:
    out = await generate(engine_url, {"input_ids": [[5, 6], [7, 8]], "rid": "nb", "sampling_params": GREEDY})
    assert [o["meta_info"]["id"] for o in out] == ["nb_0", "nb_1"]


async def test_n_samples_share_the_prompt_prefix(engine_url: str) -> None:
    p = prompt(300, 4)
    body = {"input_ids": p, "rid": "par", "sampling_params": {"temperature": 1.0, "max_new_tokens": 8, "n": 4,
                                                                "ignore_eos": True}}
    out = await generate(engine_url, body)
    assert isinstance(out, list) and len(out) == 4
    assert [o["meta_info"]["id"] for o in out] == [f"par_{j}" for j in range(4)]
    assert all(o["meta_info"]["cached_tokens"] >= len(p) - 1 for o in out)  # prefilled once
    assert len({tuple(o["output_ids"]) for o in out}) > 1  # independent samples


async def test_n_with_a_batch_is_prompt_major(engine_url: str) -> None:
    a, b = prompt(6, 5), prompt(7, 6)
    out = await generate(engine_url, {"input_ids": [a, b], "sampling_params": {**GREEDY, "n": 2}})
    assert [o["meta_info"]["prompt_tokens"] for o in out] == [6, 6, 7, 7]


async def test_list_params_with_n_and_mismatched_lists_are_400(engine_url: str) -> None:
    status, out = await post(engine_url, "/generate", {"input_ids": [[5, 6], [7, 8]], "return_logprob": [True, False],
                                                       "sampling_params": {"n": 2}})
    assert status == 400 and out["error"]["param"] == "return_logprob"
    status, out = await post(engine_url, "/generate", {"input_ids": [[5, 6], [7, 8]], "sampling_params": [{}]})
    assert status == 400 and out["error"]["param"] == "sampling_params"
    status, out = await post(engine_url, "/generate", {"input_ids": [[5, 6], [7, 8]], "rid": ["x"]})
    assert status == 400 and out["error"]["param"] == "rid"


async def test_duplicate_rids_in_one_batch_are_refused(engine_url: str) -> None:
    status, out = await post(engine_url, "/generate", {"text": ["Hello", "World"], "rid": ["dup", "dup"],
                                                       "sampling_params": GREEDY})
    assert status == 400 and "Duplicate request ID" in out["error"]["message"]
    assert (await generate(engine_url, {"input_ids": [5, 6], "rid": "dup", "sampling_params": GREEDY}))["text"] is not None


async def test_a_streamed_batch_tags_chunks_with_their_index(engine_url: str) -> None:
    chunks = await stream(engine_url, {"input_ids": [prompt(5, 7), prompt(6, 8)], "sampling_params": GREEDY})
    assert chunks[-1] == "[DONE]"
    last = {c["index"]: c for c in chunks[:-1]}
    assert set(last) == {0, 1} and all(c["meta_info"]["finish_reason"]["type"] == "length" for c in last.values())


async def test_an_empty_batch_and_mixed_prompts_are_400(engine_url: str) -> None:
    for body, field in [({"text": []}, "text"), ({"input_ids": [[1, 2], "x"]}, "input_ids[1]"),
                        ({"input_ids": [[1, 2], []]}, "input_ids[1]"), ({"text": "a", "input_ids": [1]}, "text")]:
        status, out = await post(engine_url, "/generate", body)
        assert status == 400 and out["error"]["param"] == field, (body, out)
