"""Messages: alignment invariants, typed buffers, schema versions and hostile bytes."""

from __future__ import annotations

import contextlib

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from agentrl.errors import DecodeError, SchemaVersionError
from agentrl.messages import (
    SCHEMA_VERSION,
    ChatMessage,
    Event,
    PartialRollout,
    SamplingParams,
    Task,
    Trajectory,
    Turn,
    WeightUpdate,
    decode,
    encode,
)


def make_traj(n: int = 5, prompt_len: int = 2, **kw: object) -> Trajectory:
    mask = [0] * prompt_len + [1] * (n - prompt_len)
    return Trajectory(
        id="t", task_id="k", group_id="g", tokens=list(range(n)), loss_mask=mask,
        logprobs=[-0.5] * n, versions=[-1] * prompt_len + [3] * (n - prompt_len), prompt_len=prompt_len, **kw,
    )


def test_arrays_come_back_typed_and_readonly() -> None:
    t = decode(encode(make_traj()), Trajectory)
    assert t.tokens.dtype == np.int32 and t.logprobs.dtype == np.float32
    assert t.loss_mask.dtype == np.uint8 and t.versions.dtype == np.int32
    with pytest.raises(ValueError):
        t.tokens[0] = 7


def test_arrays_travel_as_compact_buffers() -> None:
    small, big = encode(make_traj(10, 2)), encode(make_traj(10_010, 2))
    # 4 + 1 + 4 + 4 bytes per token: a list of msgpack ints/floats would need >= 16.
    assert (len(big) - len(small)) / 10_000 == pytest.approx(13, abs=0.01)


def test_misaligned_trajectory_names_fields_and_lengths() -> None:
    with pytest.raises(ValueError, match=r"tokens=3, loss_mask=2, logprobs=3, versions=3"):
        Trajectory(id="x", task_id="k", group_id="g", tokens=[1, 2, 3], loss_mask=[0, 1], logprobs=[0, 0, 0],
                   versions=[0, 0, 0], prompt_len=1)


@pytest.mark.parametrize("prompt_len", [-1, 6])
def test_prompt_len_out_of_range(prompt_len: int) -> None:
    with pytest.raises(ValueError, match="prompt_len"):
        make_traj(5, 0).__class__(id="x", task_id="k", group_id="g", tokens=[1] * 5, loss_mask=[1] * 5,
                                  logprobs=[0] * 5, versions=[0] * 5, prompt_len=prompt_len)


def test_mask_must_be_binary() -> None:
    with pytest.raises(ValueError, match="loss_mask"):
        Trajectory(id="x", task_id="k", group_id="g", tokens=[1], loss_mask=[2], logprobs=[0], versions=[0],
                   prompt_len=0)


def test_misaligned_bytes_on_the_wire_are_a_decode_error() -> None:
    raw = msgspec.msgpack.decode(encode(make_traj()))
    good = encode(make_traj(4, 1))
    raw_other = msgspec.msgpack.Decoder().decode(good)
    raw["tokens"] = raw_other["tokens"]
    with pytest.raises(DecodeError, match="misaligned"):
        decode(msgspec.msgpack.encode(raw), Trajectory)


def test_every_message_type_round_trips() -> None:
    partial = PartialRollout(tokens=[1, 2], loss_mask=[0, 1], logprobs=[0, -1], versions=[-1, 2], prompt_len=1,
                             turns=[Turn(kind="model", start=1, end=2)], state={"turn": 1})
    msgs = [
        Task(id="a", group_id="g", group_size=2, index_in_group=1, prompt=[ChatMessage(role="user", content="2+2")],
             sampling=SamplingParams(temperature=0.7, stop=["</s>"]), partial=partial, label="4"),
        Task(id="b", group_id="g", prompt_ids=[5, 6, 7]),
        make_traj(turns=[Turn(kind="tool", tool="calc", text="4", info={"ok": True})], turn_rewards=[0.5, 1.0]),
        WeightUpdate(version=3, uri="file:///tmp/w", sha256="ab", nbytes=10),
        Event(type="metrics", source="learner", data={"loss": 1.5}),
    ]
    for m in msgs:
        back = decode(encode(m))
        assert type(back) is type(m)
        assert encode(back) == encode(m)
    back_task = decode(encode(msgs[0]), Task)
    assert back_task.partial is not None and back_task.partial.versions.tolist() == [-1, 2]


def test_wrong_type_is_a_decode_error() -> None:
    with pytest.raises(DecodeError, match=r"Trajectory|WeightUpdate"):
        decode(encode(WeightUpdate(version=1, uri="x")), Trajectory)


def test_newer_schema_is_refused_clearly() -> None:
    raw = msgspec.msgpack.decode(encode(Event(type="x")))
    raw["schema"] = SCHEMA_VERSION + 1
    raw["a_field_from_the_future"] = [1, 2]
    with pytest.raises(SchemaVersionError, match=f"schema version {SCHEMA_VERSION + 1}"):
        decode(msgspec.msgpack.encode(raw))


def test_unencodable_metadata_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="cannot encode Trajectory"):
        encode(make_traj(metadata={"big": 2**70}))


def test_task_needs_a_prompt() -> None:
    with pytest.raises(ValueError, match="prompt"):
        Task(id="a", group_id="g")


def test_staleness_counts_only_trained_tokens() -> None:
    t = make_traj(5, 2)
    assert t.staleness(5).tolist() == [2, 2, 2]


@st.composite
def trajectories(draw: st.DrawFn) -> Trajectory:
    n = draw(st.integers(0, 300))
    prompt_len = draw(st.integers(0, n))
    i32, f32 = np.int32, np.float32
    return Trajectory(
        id=draw(st.text(max_size=20)), task_id=draw(st.text(max_size=5)), group_id="g",
        tokens=draw(hnp.arrays(i32, n)),
        loss_mask=draw(hnp.arrays(np.uint8, n, elements=st.integers(0, 1))),
        logprobs=draw(hnp.arrays(f32, n, elements=st.floats(width=32, allow_nan=False))),
        versions=draw(hnp.arrays(i32, n)),
        prompt_len=prompt_len, reward=draw(st.floats(allow_nan=False)),
        status=draw(st.sampled_from(["completed", "truncated", "aborted", "failed"])),
        metadata=draw(st.dictionaries(st.text(max_size=5), st.integers(-(2**63), 2**63 - 1), max_size=3)),
    )


@settings(max_examples=150, deadline=None)
@given(trajectories())
def test_any_valid_trajectory_round_trips_exactly(t: Trajectory) -> None:
    back = decode(encode(t), Trajectory)
    for name in ("tokens", "loss_mask", "logprobs", "versions"):
        np.testing.assert_array_equal(getattr(back, name), getattr(t, name))
    assert (back.id, back.prompt_len, back.reward, back.status, back.metadata) == (
        t.id, t.prompt_len, t.reward, t.status, t.metadata)
    assert encode(back) == encode(t)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_raise_our_decode_error(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode(data)


@settings(max_examples=200, deadline=None)
@given(trajectories(), st.data())
def test_corrupted_messages_raise_our_decode_error(t: Trajectory, data: st.DataObject) -> None:
    raw = bytearray(encode(t))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    with contextlib.suppress(DecodeError):
        decode(bytes(raw[:cut]))


def test_token_temperatures_follow_model_turns_and_treat_greedy_as_one() -> None:
    from agentrl.messages import Turn

    traj = Trajectory(
        id="t", task_id="t", group_id="g", tokens=np.arange(6), loss_mask=np.array([0, 1, 1, 0, 1, 1]),
        logprobs=np.zeros(6), versions=np.zeros(6), prompt_len=1, temperature=0.9,
        turns=[Turn(kind="model", start=1, end=3, temperature=0.5), Turn(kind="model", start=4, end=6, temperature=0.0)],
    )
    assert traj.token_temperatures().tolist() == pytest.approx([0.9, 0.5, 0.5, 0.9, 1.0, 1.0])
