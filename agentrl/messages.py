"""Messages that actors exchange over the bus (msgspec Structs, msgpack on the wire).

Per-token arrays (token ids, logprobs, loss mask, policy versions) travel as
compact typed buffers — a msgpack extension holding the raw little-endian bytes
— and come back as read-only numpy arrays of a fixed dtype:

=============  ========  =================================================
field          dtype     meaning
=============  ========  =================================================
``tokens``     int32     prompt + response token ids, in the order the engine saw them
``loss_mask``  uint8     1 = a model token to train on, 0 = prompt / tool / env token
``logprobs``   float32   behaviour logprob of each token under the policy that sampled it (0 where mask is 0)
``versions``   int32     policy version that produced each token (-1 for tokens the model did not sample)
=============  ========  =================================================

Every message carries ``schema``; :func:`decode` refuses a message whose schema
is newer than :data:`SCHEMA_VERSION` with :class:`~agentrl.errors.SchemaVersionError`
and any other malformed input with :class:`~agentrl.errors.DecodeError`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, TypeVar

import msgspec
import numpy as np
import numpy.typing as npt

from agentrl.errors import DecodeError, SchemaVersionError

__all__ = [
    "NOT_SAMPLED",
    "SCHEMA_VERSION",
    "AbortRequest",
    "BatchTaken",
    "BroadcastSpec",
    "ChatMessage",
    "EnvResume",
    "Event",
    "Message",
    "PartialRollout",
    "SamplingParams",
    "Task",
    "TasksDropped",
    "Trajectory",
    "TrajectoryStatus",
    "Turn",
    "WeightUpdate",
    "decode",
    "encode",
    "new_id",
]

SCHEMA_VERSION = 1
NOT_SAMPLED = -1  # the version of tokens the policy did not produce (prompt, tool output)

# A typed array is a msgpack extension whose type code names the dtype and whose data is the raw
# little-endian buffer: no per-element encoding, one copy in each direction.
_EXT_BASE = 16
_DTYPES = ("<i4", "<f4", "|u1", "<i8", "<f8")
_DTYPE_CODES: dict[str, int] = {name: _EXT_BASE + i for i, name in enumerate(_DTYPES)}
_CODE_DTYPES = {code: np.dtype(name) for name, code in _DTYPE_CODES.items()}

TrajectoryStatus = Literal["completed", "truncated", "aborted", "failed"]

IntArray = npt.NDArray[np.int32]
FloatArray = npt.NDArray[np.float32]
MaskArray = npt.NDArray[np.uint8]


def new_id() -> str:
    """A fresh random id (32 hex chars), used for tasks, groups and trajectories."""
    return uuid.uuid4().hex


def as_array(value: Any, dtype: str, field: str) -> np.ndarray:
    """Coerce ``value`` (array, list, buffer) to a 1-D little-endian array of ``dtype``; names ``field`` on error."""
    try:
        arr = np.asarray(value, dtype=np.dtype(dtype))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{field}: cannot convert to {dtype} array: {exc}") from exc
    if arr.ndim != 1:
        raise ValueError(f"{field}: expected a 1-D array, got shape {arr.shape}")
    return arr


# ---------------------------------------------------------------- wire format


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        dt = obj.dtype.newbyteorder("<") if obj.dtype.byteorder == ">" else obj.dtype
        code = _DTYPE_CODES.get(dt.str)
        if code is None or obj.ndim != 1:
            raise TypeError(f"cannot encode array of dtype {obj.dtype} and shape {obj.shape}")
        return msgspec.msgpack.Ext(code, np.ascontiguousarray(obj, dtype=dt).tobytes())
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot encode objects of type {type(obj).__name__}")


def _ext_hook(code: int, data: memoryview) -> Any:
    dtype = _CODE_DTYPES.get(code)
    if dtype is None:
        raise ValueError(f"unknown msgpack extension code {code}")
    if len(data) % dtype.itemsize:
        raise ValueError(f"array buffer of {len(data)} bytes is not a multiple of {dtype.itemsize}")
    # A read-only view into the received message: no copy (the message bytes are immutable).
    return np.frombuffer(data, dtype=dtype)


def _dec_hook(typ: type, obj: Any) -> Any:
    if typ is np.ndarray:
        if isinstance(obj, np.ndarray):
            return obj
        raise ValueError(f"expected a typed array buffer, got {type(obj).__name__}")
    raise TypeError(f"cannot decode into {typ}")


_ENCODER = msgspec.msgpack.Encoder(enc_hook=_enc_hook)


# ---------------------------------------------------------------- structs


class Message(msgspec.Struct, kw_only=True, tag_field="msg", tag=True):
    """Base of every bus message: carries the schema version it was written with."""

    schema: int = SCHEMA_VERSION


class ChatMessage(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One chat turn in OpenAI form."""

    role: str
    content: str = ""
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class SamplingParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    """SGLang sampling parameters; ``None`` means the engine default."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    max_new_tokens: int = 256
    min_new_tokens: int = 0
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    sampling_seed: int | None = None

    def to_sglang(self) -> dict[str, Any]:
        """The ``sampling_params`` object of an SGLang ``/generate`` request."""
        out: dict[str, Any] = msgspec.to_builtins(self)
        return {k: v for k, v in out.items() if v is not None}


class Turn(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One entry of a trajectory's turn log: a model call, a tool call, or an error."""

    kind: str  # "prompt" | "model" | "tool" | "env" | "error" | "abort" (a marker: where an abort fell)
    start: int = 0  # first token index of this turn within Trajectory.tokens
    end: int = 0  # one past the last token index
    text: str = ""
    tool: str | None = None
    reward: float | None = None
    finish_reason: str | None = None
    seconds: float = 0.0
    temperature: float | None = None  # model turns: the sampling temperature of their tokens
    info: dict[str, Any] = {}


EnvResumeMode = Literal["session", "snapshot", "replay"]


class EnvResume(msgspec.Struct, kw_only=True, omit_defaults=True):
    """How a resumed episode gets its environment back exactly as the aborted part left it.

    * ``session``: the env worker (``server``) keeps the episode's session (``session``) alive; re-attach to it;
    * ``snapshot``: a fresh environment ``restore()``-s ``state`` (envs with ``snapshot``/``restore``);
    * ``replay``: a fresh environment is reset and replays ``actions`` (only envs declaring ``replay_safe``).

    ``observation`` is what the first ``reset`` returned: a resumed agent's ``reset`` gets it back without the
    environment being reset.
    """

    mode: EnvResumeMode
    observation: dict[str, Any] = {}
    session: str = ""
    server: str = ""
    state: dict[str, Any] = {}
    actions: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []  # what each recorded action's step returned (replayed, never re-stepped)


class PartialRollout(msgspec.Struct, kw_only=True):
    """What an aborted episode had produced, so it can resume token for token."""

    tokens: np.ndarray
    loss_mask: np.ndarray
    logprobs: np.ndarray
    versions: np.ndarray
    prompt_len: int
    turns: list[Turn] = []
    state: dict[str, Any] = {}  # agent-defined resume state (e.g. turn counter)
    env: EnvResume | None = None  # the environment's state, when the episode has one

    def __post_init__(self) -> None:
        _align(self, "partial rollout")


class Task(Message, kw_only=True):
    """One episode to run: delivered to exactly one agent worker through the work queue."""

    id: str
    group_id: str
    group_size: int = 1
    index_in_group: int = 0
    prompt: list[ChatMessage] | None = None
    prompt_ids: np.ndarray | None = None
    env: str = ""
    env_args: dict[str, Any] = {}
    label: Any = None
    metadata: dict[str, Any] = {}
    sampling: SamplingParams = msgspec.field(default_factory=SamplingParams)
    attempt: int = 0
    admitted_version: int = 0
    is_eval: bool = False
    partial: PartialRollout | None = None

    def __post_init__(self) -> None:
        if self.prompt is None and self.prompt_ids is None:
            raise ValueError(f"task {self.id}: needs `prompt` (chat messages) or `prompt_ids`")
        if self.prompt_ids is not None:
            self.prompt_ids = as_array(self.prompt_ids, "<i4", "prompt_ids")
        if self.group_size < 1 or not 0 <= self.index_in_group < self.group_size:
            raise ValueError(
                f"task {self.id}: index_in_group={self.index_in_group} outside group_size={self.group_size}"
            )


class Trajectory(Message, kw_only=True):
    """One finished (or aborted/failed) episode: the tokens the engine consumed and produced.

    ``tokens``, ``loss_mask``, ``logprobs`` and ``versions`` always have the same
    length; construction raises ``ValueError`` naming the fields and lengths otherwise.
    """

    id: str
    task_id: str
    group_id: str
    group_size: int = 1
    tokens: np.ndarray
    loss_mask: np.ndarray
    logprobs: np.ndarray
    versions: np.ndarray
    prompt_len: int
    reward: float = 0.0
    correct: bool | None = None  # the verifier's verdict, when the env/agent gives one (eval accuracy counts it)
    turn_rewards: list[float] = []
    status: TrajectoryStatus = "completed"
    turns: list[Turn] = []
    worker_id: str = ""
    engine_id: str = ""
    env: str = ""
    is_eval: bool = False
    attempt: int = 0
    temperature: float = 1.0  # sampling temperature of model tokens not covered by a model turn's own
    metadata: dict[str, Any] = {}
    created_at: float = msgspec.field(default_factory=time.time)

    def __post_init__(self) -> None:
        _align(self, f"trajectory {self.id}")

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_trained_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def token_temperatures(self) -> np.ndarray:
        """The sampling temperature of every token (float32): each model turn's own, else ``temperature``.

        The behaviour logprobs are of ``softmax(logits / T)``, so the learner scores the same distribution.
        Greedy (``T <= 0``) counts as 1, as the engine reports logprobs of the unscaled logits then.
        """
        temps = np.full(self.num_tokens, _effective_temperature(self.temperature), dtype=np.float32)
        for turn in self.turns:
            if turn.kind == "model" and turn.temperature is not None:
                temps[turn.start:turn.end] = _effective_temperature(turn.temperature)
        return temps

    def staleness(self, current_version: int) -> np.ndarray:
        """Per trained token: how many versions behind ``current_version`` it was sampled."""
        trained = self.versions[self.loss_mask.astype(bool)]
        ages: np.ndarray = (current_version - trained).astype(np.int64)
        return ages


class BroadcastSpec(msgspec.Struct, kw_only=True):
    """A weight update that also travels by torch.distributed broadcast (``learner.weight_sync: distributed``):
    the group, its member engines (base URLs, ranks 1.. in this order), the tensors in broadcast order (SGLang's
    names / dtypes / shapes) and the wall-clock time after which the learner no longer sends (load ``uri``)."""

    group_name: str
    engines: list[str]
    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    deadline: float


class WeightUpdate(Message, kw_only=True):
    """Announces new policy weights: where they are and how to check them."""

    version: int
    uri: str  # file:///abs/dir (HF layout) or nats-object://<bucket>/<name>
    format: str = "safetensors"
    sha256: str = ""  # trainer.weights.digest_dir of the version's files (sha256 over names, sizes and 16 MiB block digests)
    nbytes: int = 0
    created_at: float = msgspec.field(default_factory=time.time)
    broadcast: BroadcastSpec | None = None  # also sent by torch.distributed broadcast (see BroadcastSpec)


class BatchTaken(Message, kw_only=True):
    """The learner took a batch (durable, on ``<run>.control.batch_taken``): step ``step`` trains from policy
    ``version`` on ``task_ids``; ``dropped_task_ids`` were consumed without training (staleness, filter, ...)."""

    step: int
    version: int
    task_ids: list[str] = []
    dropped_task_ids: list[str] = []


class TasksDropped(Message, kw_only=True):
    """Finished training tasks the learner will never train (durable, ``<run>.control.dropped``): the
    controller stops counting them and admits replacements."""

    task_ids: list[str]
    reason: str = ""


class AbortRequest(Message, kw_only=True):
    """Abort running episodes (core NATS ``<run>.events.abort``): ``task_ids``, or every one with ``all``.

    Best effort by design: a missed abort only means an episode runs to its end."""

    task_ids: list[str] = []
    all: bool = False
    reason: str = ""


class Event(Message, kw_only=True):
    """Everything else on ``<run>.events``: metrics, logs, actor lifecycle."""

    type: str  # "metrics" | "log" | "abort" | "started" | "stopped" | ...
    source: str = ""
    data: dict[str, Any] = {}
    time: float = msgspec.field(default_factory=time.time)


def _effective_temperature(t: float) -> float:
    return t if t > 0 else 1.0


_ALIGN_DTYPES = {"tokens": "<i4", "loss_mask": "|u1", "logprobs": "<f4", "versions": "<i4"}


def _align(obj: Trajectory | PartialRollout, what: str) -> None:
    for name, dtype in _ALIGN_DTYPES.items():
        arr = as_array(getattr(obj, name), dtype, f"{what}: {name}")
        arr.setflags(write=False)
        setattr(obj, name, arr)
    lengths = {name: len(getattr(obj, name)) for name in _ALIGN_DTYPES}
    if len(set(lengths.values())) != 1:
        detail = ", ".join(f"{k}={v}" for k, v in lengths.items())
        raise ValueError(f"{what}: misaligned per-token arrays ({detail})")
    if not 0 <= obj.prompt_len <= lengths["tokens"]:
        raise ValueError(f"{what}: prompt_len={obj.prompt_len} outside 0..{lengths['tokens']}")
    if obj.loss_mask.size and obj.loss_mask.max() > 1:
        raise ValueError(f"{what}: loss_mask must hold only 0 and 1")


# ---------------------------------------------------------------- encode / decode

M = TypeVar("M", bound=Message)
AnyMessage = Task | Trajectory | WeightUpdate | Event | BatchTaken | TasksDropped | AbortRequest


class _Header(msgspec.Struct):
    schema: int = SCHEMA_VERSION
    msg: str = ""


_DECODERS: dict[Any, msgspec.msgpack.Decoder[Any]] = {}
_HEADER = msgspec.msgpack.Decoder(_Header, ext_hook=lambda code, data: None)


def _decoder(typ: Any) -> msgspec.msgpack.Decoder[Any]:
    dec = _DECODERS.get(typ)
    if dec is None:
        dec = _DECODERS[typ] = msgspec.msgpack.Decoder(typ, ext_hook=_ext_hook, dec_hook=_dec_hook)
    return dec


def encode(msg: Message) -> bytes:
    """Serialize a message to msgpack bytes; ``ValueError`` names what cannot be encoded."""
    try:
        return _ENCODER.encode(msg)
    except (TypeError, OverflowError) as exc:
        raise ValueError(f"cannot encode {type(msg).__name__}: {exc}") from exc


def decode(data: bytes | memoryview, typ: type[M] | Any = AnyMessage) -> M:
    """Decode bytes into ``typ`` (default: any message type, by its tag).

    Raises :class:`SchemaVersionError` for a newer schema, :class:`DecodeError` for anything else invalid.
    """
    try:
        header = _HEADER.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError) as exc:
        raise DecodeError(f"not an agentrl message ({len(data)} bytes): {exc}") from exc
    if header.schema > SCHEMA_VERSION or header.schema < 1:
        raise SchemaVersionError(
            f"{header.msg or 'message'} has schema version {header.schema}; "
            f"this agentrl reads versions 1..{SCHEMA_VERSION} (upgrade agentrl to read it)"
        )
    try:
        message: M = _decoder(typ).decode(data)
        return message
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError) as exc:
        name = getattr(typ, "__name__", str(typ))
        raise DecodeError(f"invalid {header.msg or name} message ({len(data)} bytes): {exc}") from exc
