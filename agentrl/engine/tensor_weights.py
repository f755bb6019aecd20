"""Weights sent by value: SGLang's ``/update_weights_from_tensor`` payload.

Each entry of ``serialized_named_tensors`` is base64 of a ``multiprocessing.reduction.ForkingPickler`` dump
of ``[(name, tensor), ...]`` (SGLang's ``MultiprocessingSerializer``): a CUDA tensor travels as a CUDA IPC
handle (same GPU, another process: no copy), a CPU tensor as a shared-memory file (the sender must use
``torch.multiprocessing.set_sharing_strategy("file_system")``; the default ``file_descriptor`` strategy
cannot cross an HTTP call). Only torch's own tensor-rebuilding functions may be named by the pickle:
anything else is refused before it runs.
"""

from __future__ import annotations

import base64
import binascii
import io
import pickle
from typing import Any

import torch

from agentrl.errors import AgentRLError

__all__ = ["TensorPayloadError", "decode_named_tensors"]

_DTYPES = {name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)}
_ALLOWED: dict[str, set[str] | None] = {  # module -> allowed names (None: any name starting with rebuild_)
    "torch.multiprocessing.reductions": None,
    "torch._utils": None,
    "torch": {"Tensor", "Size", "device", "UntypedStorage", "TypedStorage", *_DTYPES},
    "torch.storage": {"UntypedStorage", "TypedStorage"},
    "torch.nn.parameter": {"Parameter"},
    "collections": {"OrderedDict"},
}


class TensorPayloadError(AgentRLError, ValueError):
    """The payload is not base64 of pickled ``(name, tensor)`` pairs made only of torch objects."""


class _TorchOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        names = _ALLOWED.get(module, set())
        ok = names is None and (name.startswith("rebuild_") or name.startswith("_rebuild_"))
        if module == "multiprocessing.resource_sharer":
            raise TensorPayloadError(
                "CPU tensors were shared by file descriptor, which cannot cross an HTTP call: call "
                "torch.multiprocessing.set_sharing_strategy('file_system') before serializing them"
            )
        if not ok and (names is None or name not in names):
            raise TensorPayloadError(f"the payload names {module}.{name}, which is not a torch tensor type")
        return super().find_class(module, name)


def decode_named_tensors(payload: str) -> list[tuple[str, torch.Tensor]]:
    """The ``(name, tensor)`` pairs of one ``serialized_named_tensors`` entry."""
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise TensorPayloadError(f"not base64: {exc}") from exc
    try:
        obj = _TorchOnly(io.BytesIO(data)).load()
    except TensorPayloadError:
        raise
    except Exception as exc:  # a foreign pickle can fail in many ways; all of them are bad input
        raise TensorPayloadError(f"cannot rebuild the tensors: {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, list | tuple) or not all(
        isinstance(p, list | tuple) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], torch.Tensor)
        for p in obj
    ):
        raise TensorPayloadError("expected a list of (name, tensor) pairs")
    return [(str(name), tensor) for name, tensor in obj]
