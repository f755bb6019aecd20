"""Config of the inference engines: the embedded server and the client/router that reaches any engine."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from agentrl.config.loader import Section

__all__ = ["EngineClientConfig", "EngineConfig"]


class EngineClientConfig(Section):
    """How agents reach engines (embedded or real SGLang) over HTTP."""

    urls: list[str] = msgspec.field(default_factory=list)
    """http://host:port of each engine; empty = the local one"""
    connect_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    """TCP connect timeout of one request"""
    request_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 600.0
    """timeout of one whole /generate call"""
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=20)] = 4
    """tries on connection errors, 429, 5xx"""
    backoff_s: Annotated[float, msgspec.Meta(ge=0)] = 0.2
    """first retry delay; doubles, capped at 5 s"""
    max_connections: Annotated[int, msgspec.Meta(ge=1)] = 1024
    """pooled connections per client"""
    health_interval_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    """router health-check period"""
    api_key: str | None = None
    """key sent to engines (SGLang's --api-key); None = $AGENTRL_ENGINE_API_KEY, so secrets need not sit in
    saved configs"""
    admin_api_key: str | None = None
    """admin key sent to engines (SGLang's --admin-api-key); None = $AGENTRL_ENGINE_ADMIN_KEY"""


class EngineConfig(Section):
    """The embedded engine (``agentrl engine``) and the client used to reach engines."""

    model: str | None = None
    """Hugging Face model directory"""
    host: str = "127.0.0.1"
    """address the engine binds; loopback by default"""
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 30000
    """HTTP port of the engine (SGLang's default 30000)"""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """weights dtype; auto: float32 on CPU, bfloat16 on CUDA"""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N (auto = cuda when available)"""
    max_running: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 64
    """requests decoded together; the rest queue"""
    max_queued: Annotated[int, msgspec.Meta(ge=0)] = 100_000
    """waiting requests beyond this get HTTP 429"""
    context_length: Annotated[int, msgspec.Meta(ge=0)] = 0
    """longest prompt + output in tokens; 0 = min(model max positions, 4096)"""
    prefix_cache: bool = True
    """radix-tree prefix cache over the KV pool (SGLang's radix cache)"""
    weight_update: Literal["swap", "drain"] = "swap"
    """swap: new weights are copied in between two decode steps (running requests continue under them, each
    token keeps its version); drain: as SGLang, a weight update waits until the running requests finish,
    admitting none meanwhile (abort_all_requests cuts the wait short: APRIL, controller.abort_on_update)"""
    weight_group_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    """bound on joining a weight-update group (/init_weights_update_group) and on receiving one update over it
    (/update_weights_from_distributed); past it the call fails and the engine leaves the group"""
    max_total_tokens: Annotated[int, msgspec.Meta(ge=0)] = 0
    """KV pool positions; 0 = (max_running + 16) * context"""
    max_prefill_tokens: Annotated[int, msgspec.Meta(ge=1)] = 16384
    """new prompt tokens per prefill forward pass: requests are admitted up to it, and a longer prompt is
    prefilled in pieces of at most this many tokens, one per scheduler iteration with a decode step of the running
    requests between pieces (chunked prefill: bounds the prefill's memory and the others' wait)"""
    overlap_schedule: bool = True
    """launch decode step N+1 before step N's tokens are committed, so the host work of a step (stops, replies,
    the next step's inputs) overlaps the device's; steps with penalties, custom processors or grammars, and
    the steps around weight updates and pauses, run one at a time (SGLang's overlap scheduler)"""
    freeze_gc: bool = True
    """freeze Python's garbage-collected heap once the engine is up (``gc.freeze``: the model, tokenizer and
    graphs are never scanned again), so collections during decoding scan only the objects requests create;
    ``/freeze_gc`` (as SGLang's) freezes again, e.g. after warm-up traffic"""
    cuda_graph: bool = True
    """capture decode steps as CUDA graphs (CUDA only)"""
    cuda_graph_batch_sizes: list[int] = msgspec.field(
        default_factory=lambda: [1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 160, 192, 224, 256]
    )
    """decode batch sizes captured as CUDA graphs (CUDA only)"""
    fused_ops: bool = True
    """on CUDA, residual add + RMSNorm, SiLU-and-mul and rotary + KV store run as Triton kernels
    (agentrl/engine/fused_ops.py) instead of the model's own modules (a few kernels each)"""
    sampling: Literal["triton", "torch"] = "triton"
    """sampling on CUDA: triton draws rows without top-k/top-p/min-p in one kernel over the logits
    (agentrl/engine/sample_kernel.py); torch runs log-softmax, cumulative sum and search as separate kernels"""
    decode_attention: Literal["triton", "sdpa"] = "triton"
    """decode-step attention on CUDA: triton reads only each row's keys (agentrl/engine/decode_attention.py); sdpa
    gathers the whole context and masks it (the CPU path)"""
    prefill: Literal["ragged", "padded"] = "ragged"
    """ragged: a prefill step packs its prompts into one row, each attending only to its own keys (flash varlen on
    CUDA in half precision, else one SDPA per prompt), so no token is computed for padding; padded: each prompt is
    padded to the step's longest and its keys gathered and masked up to the longest context"""
    torch_threads: Annotated[int, msgspec.Meta(ge=0)] = 0
    """CPU threads of torch; 0 = torch default"""
    weight_version: Annotated[int, msgspec.Meta(ge=0)] = 0
    """version reported before any weight update"""
    waiting_timeout_s: Annotated[float, msgspec.Meta(gt=0)] | None = None
    """a request waiting longer gets an error reply with timeout_status_code (SGLang's
    SGLANG_REQ_WAITING_TIMEOUT, read when unset)"""
    running_timeout_s: Annotated[float, msgspec.Meta(gt=0)] | None = None
    """a request running longer gets an error reply with timeout_status_code (SGLang's
    SGLANG_REQ_RUNNING_TIMEOUT, read when unset)"""
    timeout_status_code: Annotated[int, msgspec.Meta(ge=400, le=599)] = 503
    """HTTP status of a request that hit waiting_timeout_s or running_timeout_s"""
    api_key: str | None = None
    """SGLang's --api-key: needed by every endpoint but /health*; None = $AGENTRL_ENGINE_API_KEY"""
    admin_api_key: str | None = None
    """SGLang's --admin-api-key: needed by weights, pause, abort, flush and memory endpoints; None =
    $AGENTRL_ENGINE_ADMIN_KEY"""
    enable_custom_logit_processor: bool = False
    """runs client-sent (dill-pickled) code: off unless trusted"""
    client: EngineClientConfig = msgspec.field(default_factory=EngineClientConfig)
    """how agents and the controller reach engines (embedded or SGLang) over HTTP"""
