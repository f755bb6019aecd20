"""SGLang's ``/generate`` body, normalized into one :class:`Item` per sample (its batching and ``n`` rules).

- ``text`` (a string or a list of strings) or ``input_ids`` (a list of ids or a list of lists) — not both;
  a list means a batch and the reply is a list.
- ``sampling_params`` and the logprob fields may be one value for all or a list with one value per prompt;
  lists cannot be combined with ``sampling_params.n > 1``.
- ``n > 1`` samples each prompt ``n`` times; the reply lists prompt 0's samples first, then prompt 1's...
- ``rid``: for a batch, a string ``r`` becomes ``r_0, r_1, ...``; a list must have one rid per prompt; with
  ``n > 1`` sample ``j`` of rid ``r`` is ``r_j``. Duplicate rids are refused (HTTP 400).
- SGLang fields this engine cannot honour (multimodal inputs, LoRA, sessions, disaggregation, priorities...)
  are refused with HTTP 400 naming the field when set; fields it does not know are ignored, as in SGLang.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import msgspec

from agentrl.engine.api import BadRequest, SamplingIn, convert

__all__ = ["GenerateIn", "Item", "normalize"]

# SGLang /generate fields with no equivalent here: refused unless they hold their neutral value
UNSUPPORTED: dict[str, Any] = {
    "input_embeds": None, "image_data": None, "video_data": None, "audio_data": None, "modalities": None,
    "lora_path": None, "lora_id": None, "session_params": None, "session_id": None,
    "return_hidden_states": False, "return_routed_experts": False, "return_entropy": False,
    "return_bytes": False, "return_prompt_token_ids": False, "return_sampling_mask": None,
    "return_flat_raw_top_logprobs": False, "bootstrap_host": None, "bootstrap_port": None, "bootstrap_room": None,
    "priority": None, "extra_key": None, "cache_salt": None, "positional_embed_overrides": None,
    "require_reasoning": False, "max_thinking_tokens": None, "background": False,
}


class GenerateIn(msgspec.Struct):
    """The raw body; list-or-scalar fields are checked by :func:`normalize`."""

    text: Any = None
    input_ids: Any = None
    sampling_params: Any = None
    rid: Any = None
    return_logprob: Any = None
    logprob_start_len: Any = None
    top_logprobs_num: Any = None
    token_ids_logprob: Any = None
    return_text_in_logprobs: bool = False
    stream: bool = False
    custom_logit_processor: Any = None
    log_metrics: bool = True  # SGLang's metrics switch; this engine keeps no per-request metrics
    input_embeds: Any = None
    image_data: Any = None
    video_data: Any = None
    audio_data: Any = None
    modalities: Any = None
    lora_path: Any = None
    lora_id: Any = None
    session_params: Any = None
    session_id: Any = None
    return_hidden_states: Any = False
    return_routed_experts: Any = False
    return_entropy: Any = False
    return_bytes: Any = False
    return_prompt_token_ids: Any = False
    return_sampling_mask: Any = None
    return_flat_raw_top_logprobs: Any = False
    bootstrap_host: Any = None
    bootstrap_port: Any = None
    bootstrap_room: Any = None
    priority: Any = None
    extra_key: Any = None
    cache_salt: Any = None
    positional_embed_overrides: Any = None
    require_reasoning: Any = False
    max_thinking_tokens: Any = None
    background: Any = False


@dataclass
class Item:
    """One sample to generate: its prompt (text or ids), params and where to report errors."""

    text: str | None
    input_ids: list[Any] | None
    sampling: SamplingIn
    rid: str
    return_logprob: bool
    logprob_start_len: int | None  # -1: the last prompt token (SGLang); None: no prompt positions (OpenAI routes)
    top_logprobs_num: int
    token_ids_logprob: list[int] | None
    custom_logit_processor: str | None
    prompt_field: str  # "input_ids", "text[2]", ...
    sampling_field: str  # "sampling_params" or "sampling_params[1]"


def normalize(inp: GenerateIn) -> tuple[list[Item], bool]:
    """The samples of a request, and whether the request was a single prompt with ``n == 1`` (a dict reply)."""
    for name, neutral in UNSUPPORTED.items():
        if getattr(inp, name) != neutral:
            raise BadRequest(f"{name}: not supported by the embedded engine", name)
    prompts, field, batched = _prompts(inp)
    count = len(prompts)
    sampling = _per_prompt(inp.sampling_params, count, "sampling_params", batched, dict, {})
    params = [convert(s, SamplingIn, f) for s, f in sampling]
    n = params[0].n
    if any(p.n != n for p in params):
        raise BadRequest("sampling_params: n must be the same for every prompt", "sampling_params")
    lists = [name for name in ("return_logprob", "logprob_start_len", "top_logprobs_num", "custom_logit_processor")
             if isinstance(getattr(inp, name), list)]
    if n > 1 and lists:
        raise BadRequest(f"{lists[0]}: a list cannot be combined with sampling_params.n > 1", lists[0])
    fields = _logprob_fields(inp, count, batched)
    rids = _rids(inp.rid, count, batched)
    items = [
        Item(
            text=prompt if field == "text" else None,
            input_ids=prompt if field == "input_ids" else None,
            sampling=params[i],
            rid=rids[i] if n == 1 else f"{rids[i]}_{j}",
            return_logprob=fields["return_logprob"][i],
            logprob_start_len=fields["logprob_start_len"][i],
            top_logprobs_num=fields["top_logprobs_num"][i],
            token_ids_logprob=fields["token_ids_logprob"][i],
            custom_logit_processor=fields["custom_logit_processor"][i],
            prompt_field=f"{field}[{i}]" if batched else field,
            sampling_field=sampling[i][1],
        )
        for i, prompt in enumerate(prompts)
        for j in range(n)
    ]
    seen: set[str] = set()
    for item in items:
        if item.rid in seen:
            raise BadRequest(f"rid: Duplicate request ID detected within the request: {item.rid}", "rid")
        seen.add(item.rid)
    return items, not batched and n == 1


def _prompts(inp: GenerateIn) -> tuple[list[Any], str, bool]:
    if inp.text is not None and inp.input_ids is not None:
        raise BadRequest("text: give text or input_ids, not both", "text")
    if inp.text is None and inp.input_ids is None:
        raise BadRequest("input_ids: one of input_ids or text is required", "input_ids")
    if inp.text is not None:
        if isinstance(inp.text, str):
            return [inp.text], "text", False
        if isinstance(inp.text, list) and inp.text and all(isinstance(t, str) for t in inp.text):
            return list(inp.text), "text", True
        raise BadRequest("text: expected a string or a non-empty list of strings", "text")
    ids = inp.input_ids
    if not isinstance(ids, list) or not ids:
        raise BadRequest("input_ids: expected a non-empty list of token ids (or a list of such lists)", "input_ids")
    if isinstance(ids[0], list):
        for i, row in enumerate(ids):
            if not isinstance(row, list):
                raise BadRequest(f"input_ids[{i}]: expected a list of token ids", f"input_ids[{i}]")
        return list(ids), "input_ids", True
    return [ids], "input_ids", False


def _per_prompt(value: Any, count: int, name: str, batched: bool, kind: type, default: Any) -> list[tuple[Any, str]]:
    """(value, field name) for each prompt from one value or a list of ``count`` values."""
    if value is None:
        return [(default, name)] * count
    if isinstance(value, list) and kind is not list:
        if not batched and count == 1:
            raise BadRequest(f"{name}: a list is only allowed for a batch of prompts", name)
        if len(value) != count:
            raise BadRequest(f"{name}: {len(value)} values for {count} prompts", name)
        return [(v, f"{name}[{i}]") for i, v in enumerate(value)]
    return [(value, name)] * count


def _logprob_fields(inp: GenerateIn, count: int, batched: bool) -> dict[str, list[Any]]:
    specs: dict[str, tuple[type, Any]] = {
        "return_logprob": (bool, False),
        "logprob_start_len": (int, -1),
        "top_logprobs_num": (int, 0),
        "custom_logit_processor": (str, None),
    }
    out: dict[str, list[Any]] = {}
    for name, (typ, default) in specs.items():
        values = _per_prompt(getattr(inp, name), count, name, batched, typ, default)
        out[name] = [_typed(v, typ, f, default) for v, f in values]
    for i, n in enumerate(out["top_logprobs_num"]):
        if n < 0:
            raise BadRequest(f"top_logprobs_num: {n} is negative", "top_logprobs_num" if not batched else f"top_logprobs_num[{i}]")
    out["token_ids_logprob"] = _token_ids(inp.token_ids_logprob, count)
    return out


def _typed(value: Any, typ: type, field: str, default: Any) -> Any:
    if value is None:
        return default
    if typ is int and (type(value) is not int):
        raise BadRequest(f"{field}: expected an integer", field)
    if typ is not int and not isinstance(value, typ):
        raise BadRequest(f"{field}: expected {typ.__name__}", field)
    return value


def _token_ids(value: Any, count: int) -> list[list[int] | None]:
    if value is None or value == []:
        return [None] * count
    if not isinstance(value, list):
        raise BadRequest("token_ids_logprob: expected a list of token ids (or one list per prompt)", "token_ids_logprob")
    if isinstance(value[0], list):
        if len(value) != count:
            raise BadRequest(f"token_ids_logprob: {len(value)} lists for {count} prompts", "token_ids_logprob")
        return list(value)
    return [list(value)] * count


def _rids(rid: Any, count: int, batched: bool) -> list[str]:
    if rid is None:
        return [uuid.uuid4().hex for _ in range(count)]
    if isinstance(rid, str):
        if not rid:
            raise BadRequest("rid: must not be empty", "rid")
        return [rid] if not batched else [f"{rid}_{i}" for i in range(count)]
    if isinstance(rid, list) and all(isinstance(r, str) and r for r in rid):
        if not batched or len(rid) != count:
            raise BadRequest(f"rid: {len(rid)} rids for {count} prompts", "rid")
        return list(rid)
    raise BadRequest("rid: expected a non-empty string or a list of them", "rid")
