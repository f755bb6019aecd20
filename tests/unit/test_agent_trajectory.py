"""TrajectoryBuilder keeps tokens, mask, logprobs and versions aligned whatever is appended."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentrl.agent import TrajectoryBuilder
from agentrl.messages import NOT_SAMPLED, decode, encode


def test_model_and_masked_segments_are_aligned() -> None:
    b = TrajectoryBuilder(capacity=1)
    b.set_prompt([1, 2, 3])
    assert b.append_model([10, 11], [-0.5, -0.25], [4, 5]) == (3, 5)
    assert b.append_masked([7, 8, 9]) == (5, 8)
    assert b.append_model([12], [-1.0], 6) == (8, 9)
    t = b.build(id="t-0", task_id="t", group_id="g", reward=1.0)
    assert t.tokens.tolist() == [1, 2, 3, 10, 11, 7, 8, 9, 12]
    assert t.loss_mask.tolist() == [0, 0, 0, 1, 1, 0, 0, 0, 1]
    assert t.logprobs.tolist() == [0, 0, 0, -0.5, -0.25, 0, 0, 0, -1.0]
    assert t.versions.tolist() == [NOT_SAMPLED] * 3 + [4, 5] + [NOT_SAMPLED] * 3 + [6]
    assert t.prompt_len == 3
    assert decode(encode(t)).tokens.tolist() == t.tokens.tolist()


@pytest.mark.parametrize(
    ("ids", "lps", "vers"),
    [([1, 2], [-0.1], [0, 0]), ([1], [-0.1, -0.2], 0), ([1, 2], [-0.1, -0.2], [0])],
)
def test_misaligned_model_output_raises_naming_lengths(ids: list[int], lps: list[float], vers: object) -> None:
    b = TrajectoryBuilder()
    with pytest.raises(ValueError, match="misaligned model output"):
        b.append_model(ids, lps, vers)  # type: ignore[arg-type]
    assert len(b) == 0


def test_negative_version_and_late_prompt_are_refused() -> None:
    b = TrajectoryBuilder()
    with pytest.raises(ValueError, match="versions must be >= 0"):
        b.append_model([1], [0.0], [-1])
    b.append_masked([1])
    with pytest.raises(ValueError, match="already holds 1 tokens"):
        b.set_prompt([2])


def test_token_ids_view_is_read_only() -> None:
    b = TrajectoryBuilder()
    b.set_prompt([1, 2])
    with pytest.raises(ValueError):
        b.token_ids[0] = 5


def test_partial_round_trip_and_truncate() -> None:
    b = TrajectoryBuilder()
    b.set_prompt([1, 2])
    b.append_model([3, 4], [-0.1, -0.2], 2)
    p = b.to_partial({"turns": 1})
    b2 = TrajectoryBuilder.from_partial(p)
    b2.append_model([5], [-0.3], 3)
    assert b2.token_ids.tolist() == [1, 2, 3, 4, 5]
    assert b2.versions.tolist() == [-1, -1, 2, 2, 3]
    assert b2.prompt_len == 2
    b2.truncate(4, 0)
    assert b2.token_ids.tolist() == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="outside the trajectory"):
        b2.truncate(1, 0)


segment = st.one_of(
    st.tuples(st.just("model"), st.lists(st.integers(0, 1000), max_size=40), st.integers(0, 9)),
    st.tuples(st.just("masked"), st.lists(st.integers(0, 1000), max_size=40), st.just(-1)),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 1000), min_size=1, max_size=20), st.lists(segment, max_size=12))
def test_any_append_sequence_matches_reference(prompt: list[int], segments: list[tuple[str, list[int], int]]) -> None:
    b = TrajectoryBuilder(capacity=1)
    b.set_prompt(prompt)
    ref_tokens, ref_mask, ref_lp, ref_ver = list(prompt), [0] * len(prompt), [0.0] * len(prompt), [-1] * len(prompt)
    for kind, ids, version in segments:
        if kind == "model":
            lps = [-(i + 1) / 8 for i in range(len(ids))]
            b.append_model(ids, lps, version)
            ref_mask += [1] * len(ids)
            ref_lp += lps
            ref_ver += [version] * len(ids)
        else:
            b.append_masked(ids)
            ref_mask += [0] * len(ids)
            ref_lp += [0.0] * len(ids)
            ref_ver += [-1] * len(ids)
        ref_tokens += ids
    t = b.build(id="x-0", task_id="x", group_id="g")
    assert t.tokens.tolist() == ref_tokens
    assert t.loss_mask.tolist() == ref_mask
    np.testing.assert_array_equal(t.logprobs, np.asarray(ref_lp, dtype=np.float32))
    assert t.versions.tolist() == ref_ver
