"""Pure request building and response parsing for SGLang's HTTP API (no I/O; unit-tested without a server).

The same functions serve agentrl's embedded engine and a real SGLang server. The one difference a caller
can see: SGLang reports only ``meta_info.weight_version`` (a string, ``"default"`` unless set), not the
per-token ``output_token_versions`` the embedded engine adds. Without them, every token gets the
request's final ``weight_version`` (so a request that spanned a weight update is attributed entirely to
the newer version); a non-integer version string counts as version 0.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from agentrl.errors import EngineError, EngineRequestError, EngineUnavailable
from agentrl.generation import GenerateOutput
from agentrl.messages import SamplingParams

__all__ = [
    "ADMIN_KEY_ENV",
    "ADMIN_PATHS",
    "API_KEY_ENV",
    "auth_headers",
    "build_abort_request",
    "build_generate_request",
    "build_init_weights_group_request",
    "build_memory_request",
    "build_update_weights_from_distributed_request",
    "build_update_weights_from_tensor_request",
    "build_update_weights_request",
    "error_for_status",
    "error_message",
    "parse_generate_response",
    "parse_weight_version",
    "resolve_key",
]

API_KEY_ENV = "AGENTRL_ENGINE_API_KEY"  # SGLang's --api-key: every endpoint but /health*
ADMIN_KEY_ENV = "AGENTRL_ENGINE_ADMIN_KEY"  # SGLang's --admin-api-key: the endpoints below

ADMIN_PATHS = frozenset({
    "/update_weights_from_disk", "/update_weights_from_tensor", "/pause_generation", "/continue_generation",
    "/abort_request", "/flush_cache", "/release_memory_occupation", "/resume_memory_occupation", "/freeze_gc",
    "/init_weights_update_group", "/update_weights_from_distributed", "/destroy_weights_update_group",
})


def resolve_key(configured: str | None, env: str) -> str | None:
    """The configured key, else the environment variable ``env``; empty means none."""
    key = configured if configured is not None else os.environ.get(env)
    return key or None


def auth_headers(path: str, api_key: str | None, admin_key: str | None) -> dict[str, str]:
    """``Authorization: Bearer`` for a call to ``path``: the admin key on admin endpoints (else the API key)."""
    key = (admin_key or api_key) if path in ADMIN_PATHS else api_key
    return {"Authorization": f"Bearer {key}"} if key else {}


def build_generate_request(
    input_ids: Sequence[int] | np.ndarray,
    sampling: SamplingParams,
    *,
    rid: str | None = None,
    return_logprob: bool = True,
) -> dict[str, Any]:
    """The JSON body of ``POST /generate`` for token-in/token-out generation."""
    body: dict[str, Any] = {
        "input_ids": [int(t) for t in input_ids],
        "sampling_params": sampling.to_sglang(),
        "return_logprob": return_logprob,
        "stream": False,
    }
    if rid is not None:
        body["rid"] = rid
    return body


def build_abort_request(rid: str | None) -> dict[str, Any]:
    """``POST /abort_request`` body: one request by rid, or every request when ``rid`` is None."""
    return {"abort_all": True} if rid is None else {"rid": rid}


def build_update_weights_request(model_path: str, version: int) -> dict[str, Any]:
    """``POST /update_weights_from_disk`` body (SGLang takes the version as a string)."""
    return {"model_path": model_path, "weight_version": str(version)}


def build_update_weights_from_tensor_request(named_tensors: Iterable[tuple[str, Any]], version: int) -> dict[str, Any]:
    """``POST /update_weights_from_tensor`` body, in SGLang's format (base64 of a ``ForkingPickler`` dump).

    CUDA tensors travel as IPC handles (the engine must be on the same GPU; keep the tensors alive until the
    call returns). CPU tensors travel as shared-memory files: call
    ``torch.multiprocessing.set_sharing_strategy("file_system")`` before building the body.
    """
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401  (registers torch's tensor reductions with ForkingPickler)

    buf = io.BytesIO()
    ForkingPickler(buf).dump(list(named_tensors))
    return {"serialized_named_tensors": [base64.b64encode(buf.getvalue()).decode()], "weight_version": str(version)}


def build_init_weights_group_request(
    master_address: str, master_port: int, rank_offset: int, world_size: int, group_name: str, backend: str,
) -> dict[str, Any]:
    """``POST /init_weights_update_group`` body (SGLang's field names): join as ranks ``rank_offset``.. of
    ``world_size``; rank 0, the trainer, serves the rendezvous at ``master_address:master_port``."""
    return {"master_address": master_address, "master_port": int(master_port), "rank_offset": int(rank_offset),
            "world_size": int(world_size), "group_name": group_name, "backend": backend}


def build_update_weights_from_distributed_request(
    names: Sequence[str], dtypes: Sequence[str], shapes: Sequence[Sequence[int]], group_name: str, version: int, *,
    abort_all_requests: bool = False,
) -> dict[str, Any]:
    """``POST /update_weights_from_distributed`` body: receive these tensors, broadcast by rank 0 in this order."""
    if not len(names) == len(dtypes) == len(shapes):
        raise ValueError(f"{len(names)} names, {len(dtypes)} dtypes and {len(shapes)} shapes: they must match")
    return {"names": list(names), "dtypes": list(dtypes), "shapes": [[int(d) for d in s] for s in shapes],
            "group_name": group_name, "weight_version": str(version), "abort_all_requests": abort_all_requests,
            "flush_cache": True}


def build_memory_request(tags: Sequence[str] | None = None) -> dict[str, Any]:
    """``/release_memory_occupation`` / ``/resume_memory_occupation`` body; None = every kind of memory."""
    return {} if tags is None else {"tags": list(tags)}


def parse_weight_version(value: Any) -> int:
    """An engine's weight version as an int; SGLang's ``"default"`` (or anything non-numeric) is 0."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _finish(reason: Any, engine_id: str) -> tuple[str, int | str | None]:
    if not isinstance(reason, dict) or reason.get("type") not in ("stop", "length", "abort"):
        raise EngineError(f"engine {engine_id}: unexpected finish_reason {reason!r}")
    matched = reason.get("matched") if reason["type"] == "stop" else None
    return str(reason["type"]), matched if isinstance(matched, int | str) else None


def parse_generate_response(payload: Any, *, engine_id: str = "") -> GenerateOutput:
    """Turn a ``/generate`` JSON response into a :class:`GenerateOutput`.

    Reads ``output_ids`` (or, if absent, the token ids of ``output_token_logprobs``), logprobs from the
    ``[logprob, token_id, text|None]`` triples (NaN when the request did not ask for logprobs), the finish
    reason and versions (see the module docstring). Raises :class:`EngineError` on a malformed response.
    """
    if not isinstance(payload, dict) or not isinstance(payload.get("meta_info"), dict):
        raise EngineError(f"engine {engine_id}: /generate response has no meta_info: {str(payload)[:200]}")
    meta = payload["meta_info"]
    triples = meta.get("output_token_logprobs")
    ids = payload.get("output_ids")
    if ids is None and triples is not None:
        ids = [t[1] for t in triples]
    if not isinstance(ids, list):
        raise EngineError(f"engine {engine_id}: /generate response has no output_ids")
    if triples is None:
        logprobs = np.full(len(ids), np.nan, dtype=np.float32)
    elif len(triples) != len(ids):
        raise EngineError(f"engine {engine_id}: {len(triples)} logprobs for {len(ids)} output tokens")
    else:
        logprobs = np.asarray([t[0] for t in triples], dtype=np.float32)
    version = parse_weight_version(meta.get("weight_version"))
    versions = meta.get("output_token_versions")
    if versions is None or len(versions) != len(ids):
        versions = [version] * len(ids)
    finish, matched = _finish(meta.get("finish_reason"), engine_id)
    return GenerateOutput(
        output_ids=np.asarray(ids, dtype=np.int32),
        logprobs=logprobs,
        versions=np.asarray(versions, dtype=np.int32),
        text=str(payload.get("text", "")),
        finish_reason=finish,  # type: ignore[arg-type]
        matched_stop=matched,
        prompt_tokens=int(meta.get("prompt_tokens", 0)),
        weight_version=version,
        rid=str(meta.get("id", "")),
        engine_id=engine_id,
    )


def error_message(body: Any) -> str:
    """The human message of an error body (``{"error": {"message"}}``, ``{"message"}``, or the raw text)."""
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        if isinstance(err, str):
            return err
        if "message" in body:
            return str(body["message"])
    return str(body)[:500]


def error_for_status(status: int, body: Any, where: str) -> EngineError:
    """Map an HTTP error status to agentrl's errors: 429 and 5xx are retryable, other 4xx are not."""
    message = f"{where}: HTTP {status}: {error_message(body)}"
    if status == 429 or status >= 500:
        return EngineUnavailable(message)
    return EngineRequestError(message, status)
