"""Request schemas of the engine's SGLang-native HTTP API, and their validation.

Bodies are decoded with msgspec into the Structs below; any problem raises :class:`BadRequest` whose message
names the field (``sampling_params.temperature: Expected `float`, got `str```), answered as HTTP 400.
Unknown ``sampling_params`` keys are rejected, as SGLang rejects them. ``/generate`` bodies are normalized
into one item per sample by :mod:`agentrl.engine.generate_in`.
"""

from __future__ import annotations

import math
import random
import re
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from agentrl.engine.request import RequestOptions
from agentrl.errors import AgentRLError

__all__ = [
    "AbortIn",
    "BadRequest",
    "DestroyWeightsGroupIn",
    "DetokenizeIn",
    "InitWeightsGroupIn",
    "MemoryIn",
    "PauseIn",
    "SamplingIn",
    "TokenizeIn",
    "UpdateWeightsDistributedIn",
    "UpdateWeightsIn",
    "UpdateWeightsTensorIn",
    "check_tokens",
    "convert",
    "decode_body",
    "parse_version",
    "to_options",
]

T = TypeVar("T")


class BadRequest(AgentRLError):
    """An invalid request; ``field`` is the dotted name of the offending field when known."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


Penalty = Annotated[float, msgspec.Meta(ge=-2, le=2)]


class SamplingIn(msgspec.Struct, forbid_unknown_fields=True):
    """SGLang ``sampling_params``; at most one of ``regex`` / ``json_schema`` / ``ebnf``."""

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
    n: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 1
    frequency_penalty: Penalty = 0.0
    presence_penalty: Penalty = 0.0
    repetition_penalty: Annotated[float, msgspec.Meta(gt=0, le=2)] = 1.0
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    stream_interval: Annotated[int, msgspec.Meta(ge=1)] | None = None
    logit_bias: dict[str, float] | None = None
    custom_params: dict[str, Any] | None = None

    @property
    def grammar(self) -> tuple[Literal["regex", "json_schema", "ebnf"], str] | None:
        given = [(k, v) for k, v in (("regex", self.regex), ("json_schema", self.json_schema), ("ebnf", self.ebnf))
                 if v is not None]
        return given[0] if given else None  # type: ignore[return-value]


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


class UpdateWeightsTensorIn(msgspec.Struct):
    """SGLang's ``/update_weights_from_tensor``: one base64 ``MultiprocessingSerializer`` string per TP rank."""

    serialized_named_tensors: list[str]
    load_format: str | None = None
    flush_cache: bool = True
    abort_all_requests: bool = False
    weight_version: str | int | None = None


class InitWeightsGroupIn(msgspec.Struct):
    """SGLang's ``/init_weights_update_group``: join the trainer's group as rank ``rank_offset`` (one rank here)."""

    master_address: str
    master_port: Annotated[int, msgspec.Meta(ge=1, le=65535)]
    rank_offset: Annotated[int, msgspec.Meta(ge=0)]
    world_size: Annotated[int, msgspec.Meta(ge=1)]
    group_name: str = "weight_update_group"
    backend: str = "nccl"


class UpdateWeightsDistributedIn(msgspec.Struct):
    """SGLang's ``/update_weights_from_distributed``: receive each named tensor by broadcast from rank 0."""

    names: list[str]
    dtypes: list[str]
    shapes: list[list[Annotated[int, msgspec.Meta(ge=0)]]]
    group_name: str = "weight_update_group"
    flush_cache: bool = True
    abort_all_requests: bool = False
    weight_version: str | int | None = None
    load_format: str | None = None
    torch_empty_cache: bool = False


class DestroyWeightsGroupIn(msgspec.Struct):
    """SGLang's ``/destroy_weights_update_group``."""

    group_name: str = "weight_update_group"


class MemoryIn(msgspec.Struct):
    """``/release_memory_occupation`` and ``/resume_memory_occupation``: None = every kind of memory."""

    tags: list[Literal["kv_cache", "weights", "cuda_graph"]] | None = None


class TokenizeIn(msgspec.Struct):
    model: str | None = None
    prompt: str | list[str] | None = None
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeIn(msgspec.Struct):
    tokens: list[Any]  # token ids, or one list of ids per text (checked by the route)
    model: str | None = None
    skip_special_tokens: bool = True


_AT = re.compile(r"^(?P<what>.*?) - at `\$\.?(?P<path>[^`]*)`$", re.S)


def decode_body(body: bytes, typ: type[T]) -> T:
    """Decode a JSON body as ``typ``; an empty body is ``{}``; errors raise :class:`BadRequest` naming the field."""
    try:
        return msgspec.json.decode(body or b"{}", type=typ)
    except msgspec.ValidationError as exc:
        raise _bad(exc, "") from exc
    except msgspec.DecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise BadRequest("request body is nested too deeply") from exc


def convert(value: Any, typ: type[T], field: str) -> T:
    """Validate an already-decoded JSON value as ``typ``; errors name ``field`` (plus the path inside it)."""
    try:
        return msgspec.convert(value, type=typ)
    except msgspec.ValidationError as exc:
        raise _bad(exc, field) from exc
    except RecursionError as exc:
        raise BadRequest(f"{field}: nested too deeply", field) from exc


def _bad(exc: msgspec.ValidationError, prefix: str) -> BadRequest:
    m = _AT.match(str(exc))
    what, path = (m.group("what"), _join(prefix, m.group("path"))) if m else (str(exc), prefix)
    unknown = re.match(r"Object contains unknown field `([^`]+)`", what)
    if unknown:
        field = _join(path, unknown.group(1))
        return BadRequest(f"{field}: unknown field", field)
    missing = re.match(r"Object missing required field `([^`]+)`", what)
    if missing:
        field = _join(path, missing.group(1))
        return BadRequest(f"{field}: required field missing", field)
    return BadRequest(f"{path or 'request'}: {what}", path or None)


def _join(prefix: str, path: str) -> str:
    if not path:
        return prefix
    if not prefix:
        return path
    return f"{prefix}{path}" if path.startswith("[") else f"{prefix}.{path}"


def check_tokens(ids: Any, field: str, vocab_size: int) -> list[int]:
    """``ids`` as a list of token ids in ``[0, vocab_size)``; anything else is a :class:`BadRequest` naming ``field``."""
    if not isinstance(ids, list) or not all(type(t) is int for t in ids):
        raise BadRequest(f"{field}: expected a list of integer token ids", field)
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise BadRequest(f"{field}: token id {bad} is not in [0, {vocab_size})", field)
    return ids


def parse_version(value: str | int | None, current: int) -> int:
    """A ``weight_version``: an integer or a string of one, >= 0; None keeps ``current``."""
    if value is None:
        return current
    try:
        version = int(value)
    except ValueError as exc:
        raise BadRequest(f"weight_version: {value!r} is not an integer (or a string of one)", "weight_version") from exc
    if version < 0:
        raise BadRequest(f"weight_version: {version} is negative", "weight_version")
    return version


def to_options(s: SamplingIn, *, vocab_size: int, room: int, field: str = "sampling_params") -> RequestOptions:
    """Engine options from validated sampling params; ``room`` = context length minus prompt length."""
    if s.top_k == 0:
        raise BadRequest(f"{field}.top_k: must be -1 (no limit) or >= 1", f"{field}.top_k")
    for t in s.stop_token_ids or []:
        if t >= vocab_size:
            raise BadRequest(f"{field}.stop_token_ids: {t} >= vocab size {vocab_size}", f"{field}.stop_token_ids")
    stop = [s.stop] if isinstance(s.stop, str) else list(s.stop or [])
    if any(not x for x in stop):
        raise BadRequest(f"{field}.stop: stop strings must be non-empty", f"{field}.stop")
    grammars = [k for k in ("regex", "json_schema", "ebnf") if getattr(s, k) is not None]
    if len(grammars) > 1:
        raise BadRequest(f"{field}: only one of regex, json_schema or ebnf can be set (got {grammars})", f"{field}.{grammars[1]}")
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
        logit_bias=_logit_bias(s.logit_bias, vocab_size, f"{field}.logit_bias"),
        repetition_penalty=s.repetition_penalty,
        frequency_penalty=s.frequency_penalty,
        presence_penalty=s.presence_penalty,
    )


def _logit_bias(bias: dict[str, float] | None, vocab_size: int, field: str) -> dict[int, float] | None:
    """SGLang's ``logit_bias``: string token ids to finite biases added to the logits."""
    if not bias:
        return None
    out: dict[int, float] = {}
    for key, value in bias.items():
        if not re.fullmatch(r"\d{1,12}", key.strip()) or not int(key) < vocab_size:
            raise BadRequest(f"{field}: key {key!r} is not a token id in [0, {vocab_size})", field)
        if not math.isfinite(value):
            raise BadRequest(f"{field}: bias of token {key} is not a finite number", field)
        out[int(key)] = value
    return out
