"""Request schemas of the engine's SGLang-native HTTP API, and their validation.

Bodies are decoded with msgspec into the Structs below; any problem raises :class:`BadRequest` whose message
names the field (``sampling_params.temperature: Expected `float`, got `str```), answered as HTTP 400.
Top-level fields this engine does not use are ignored, as SGLang ignores what it does not know of a client;
unknown ``sampling_params`` keys are rejected, as SGLang rejects them.
"""

from __future__ import annotations

import random
import re
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from agentrl.engine.request import RequestOptions

__all__ = [
    "AbortIn",
    "BadRequest",
    "GenerateIn",
    "PauseIn",
    "SamplingIn",
    "UpdateWeightsIn",
    "decode_body",
    "to_options",
]

T = TypeVar("T")


class BadRequest(Exception):
    """An invalid request; ``field`` is the dotted name of the offending field when known."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class SamplingIn(msgspec.Struct, forbid_unknown_fields=True):
    """SGLang ``sampling_params``. Penalties, ``n`` and constrained decoding are accepted only at neutral values."""

    temperature: Annotated[float, msgspec.Meta(ge=0, le=100)] = 1.0
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] = 1.0
    top_k: Annotated[int, msgspec.Meta(ge=-1)] = -1
    min_p: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.0
    max_new_tokens: Annotated[int, msgspec.Meta(ge=0)] | None = 128
    min_new_tokens: Annotated[int, msgspec.Meta(ge=0)] = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[Annotated[int, msgspec.Meta(ge=0)]] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    sampling_seed: int | None = None
    n: Annotated[int, msgspec.Meta(ge=1, le=1)] = 1
    frequency_penalty: Annotated[float, msgspec.Meta(ge=0, le=0)] = 0.0
    presence_penalty: Annotated[float, msgspec.Meta(ge=0, le=0)] = 0.0
    repetition_penalty: Annotated[float, msgspec.Meta(ge=1, le=1)] = 1.0
    json_schema: None = None
    regex: None = None
    ebnf: None = None
    stream_interval: int | None = None
    logit_bias: dict[str, float] | None = None
    custom_params: dict[str, Any] | None = None


class GenerateIn(msgspec.Struct):
    """SGLang ``/generate`` body (one request; batched lists are refused)."""

    text: str | None = None
    input_ids: list[int] | None = None
    sampling_params: SamplingIn = msgspec.field(default_factory=SamplingIn)
    rid: str | None = None
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: Annotated[int, msgspec.Meta(ge=0, le=0)] = 0
    return_text_in_logprobs: bool = False
    stream: bool = False


class AbortIn(msgspec.Struct):
    rid: str = ""
    abort_all: bool = False


class PauseIn(msgspec.Struct):
    mode: Literal["abort", "retract", "in_place"] = "abort"


class UpdateWeightsIn(msgspec.Struct):
    model_path: str
    load_format: str | None = None
    abort_all_requests: bool = False
    weight_version: str | int | None = None
    flush_cache: bool = True


_AT = re.compile(r"^(?P<what>.*?) - at `\$\.?(?P<path>[^`]*)`$", re.S)


def decode_body(body: bytes, typ: type[T]) -> T:
    """Decode a JSON body as ``typ``; an empty body is ``{}``; errors raise :class:`BadRequest` naming the field."""
    try:
        return msgspec.json.decode(body or b"{}", type=typ)
    except msgspec.ValidationError as exc:
        m = _AT.match(str(exc))
        if m is None:
            raise BadRequest(f"invalid request: {exc}") from exc
        path = m.group("path")
        unknown = re.match(r"Object contains unknown field `([^`]+)`", m.group("what"))
        if unknown:
            field = f"{path}.{unknown.group(1)}" if path else unknown.group(1)
            raise BadRequest(f"{field}: unknown field", field) from exc
        raise BadRequest(f"{path}: {m.group('what')}", path) from exc
    except msgspec.DecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from exc


def to_options(s: SamplingIn, *, vocab_size: int, room: int) -> RequestOptions:
    """Engine options from validated sampling params; ``room`` = context length minus prompt length."""
    if s.top_k == 0:
        raise BadRequest("sampling_params.top_k: must be -1 (no limit) or >= 1", "sampling_params.top_k")
    for t in s.stop_token_ids or []:
        if t >= vocab_size:
            raise BadRequest(f"sampling_params.stop_token_ids: {t} >= vocab size {vocab_size}", "sampling_params.stop_token_ids")
    stop = [s.stop] if isinstance(s.stop, str) else list(s.stop or [])
    if any(not x for x in stop):
        raise BadRequest("sampling_params.stop: stop strings must be non-empty", "sampling_params.stop")
    max_new = room if s.max_new_tokens is None else min(s.max_new_tokens, room)
    seed = s.sampling_seed if s.sampling_seed is not None else random.getrandbits(62)
    return RequestOptions(
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        min_p=s.min_p,
        max_new_tokens=max_new,
        min_new_tokens=min(s.min_new_tokens, max_new),
        stop=stop,
        stop_token_ids=list(s.stop_token_ids or []),
        ignore_eos=s.ignore_eos,
        skip_special_tokens=s.skip_special_tokens,
        no_stop_trim=s.no_stop_trim,
        seed=seed & ((1 << 62) - 1),
    )
