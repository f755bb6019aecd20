"""Fuzzing every bus message type's decoding: random, mutated and mistyped bytes raise only DecodeError.

Anything the bus delivers goes through :func:`agentrl.messages.decode`; a consumer dead-letters what raises
:class:`~agentrl.errors.DecodeError` and would crash (or loop on redelivery) on any other exception. The
message types are found by walking :class:`~agentrl.messages.Message`'s subclasses, so a new one is fuzzed
without touching this file. Bounded: a fixed number of examples per strategy, no per-example deadline.
"""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import agentrl.env.wire  # noqa: F401  (registers the env request/reply message types)
from agentrl.errors import DecodeError
from agentrl.messages import AnyMessage, ChatMessage, Message, Task, Trajectory, decode, encode

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _message_types() -> list[type[Message]]:
    found: list[type[Message]] = []
    todo = list(Message.__subclasses__())
    while todo:
        typ = todo.pop()
        found.append(typ)
        todo += typ.__subclasses__()
    return sorted(set(found), key=lambda t: t.__name__)


TYPES = _message_types()
TARGETS: list[Any] = [*TYPES, AnyMessage]


def _valid_samples() -> list[bytes]:
    """A few real encodings to mutate (the mutations then reach deep into the decoders)."""
    n = 6
    traj = Trajectory(id="t", task_id="k", group_id="g", tokens=np.arange(n), loss_mask=np.array([0, 0, 1, 1, 1, 1]),
                      logprobs=np.full(n, -0.5), versions=np.array([-1, -1, 0, 0, 1, 1]), prompt_len=2, reward=1.0)
    task = Task(id="k", group_id="g", group_size=2, prompt=[ChatMessage(role="user", content="2+2?")], label="4",
                env="calc", env_args={"a": 1})
    return [encode(traj), encode(task)]


SAMPLES = _valid_samples()


def _decode_or_decode_error(data: bytes, typ: Any) -> None:
    try:
        out = decode(data, typ)
    except DecodeError:
        return
    assert isinstance(out, Message)


def test_every_message_type_is_found() -> None:
    names = {t.__name__ for t in TYPES}
    assert {"Task", "Trajectory", "WeightUpdate", "Event", "AbortRequest", "EnvRequest", "EnvReply"} <= names


@pytest.mark.parametrize("typ", TARGETS, ids=lambda t: getattr(t, "__name__", "AnyMessage"))
@FUZZ
@given(data=st.binary(max_size=512))
def test_random_bytes(typ: Any, data: bytes) -> None:
    _decode_or_decode_error(data, typ)


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SAMPLES)))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        i = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[i] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del data[i:]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif data:
            del data[i: i + draw(st.integers(1, 8))]
    return bytes(data)


@pytest.mark.parametrize("typ", TARGETS, ids=lambda t: getattr(t, "__name__", "AnyMessage"))
@FUZZ
@given(data=_mutated())
def test_mutated_valid_messages(typ: Any, data: bytes) -> None:
    _decode_or_decode_error(data, typ)


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70).filter(lambda v: -(2**63) <= v < 2**64),
                     st.floats(allow_nan=True), st.text(max_size=8), st.binary(max_size=8))
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6),
                                                                                              inner, max_size=4),
                       max_leaves=12)
_ARRAY = st.builds(lambda code, body: msgspec.msgpack.Ext(code, body), st.integers(0, 24), st.binary(max_size=16))


@st.composite
def _mistyped(draw: st.DrawFn, typ: type[Message]) -> bytes:
    """A well-formed msgpack map with the type's tag and field names but arbitrary values (arrays included)."""
    fields = {name: draw(st.one_of(_values, _ARRAY)) for name in typ.__struct_fields__
              if draw(st.booleans())}
    fields["msg"] = draw(st.sampled_from([typ.__struct_config__.tag, "Task", "nope"]))
    fields["schema"] = draw(st.sampled_from([1, 1, 0, 2, -1, "1"]))
    return msgspec.msgpack.encode(fields)


@pytest.mark.parametrize("typ", TYPES, ids=lambda t: t.__name__)
@FUZZ
@given(data=st.data())
def test_well_formed_maps_with_wrong_values(typ: type[Message], data: st.DataObject) -> None:
    raw = data.draw(_mistyped(typ))
    _decode_or_decode_error(raw, typ)
    _decode_or_decode_error(raw, AnyMessage)
