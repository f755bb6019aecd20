"""SGLang's ``custom_logit_processor``: a client-defined Python class, serialized with dill, run by the engine.

The wire format is SGLang's (``CustomLogitProcessor.to_str()``): ``{"callable": "<hex of dill.dumps(cls)>"}``.
The class is instantiated once per distinct string and called as ``processor(logits[rows], params)`` with
one dict per row: the request's ``sampling_params.custom_params`` plus ``"__req__"`` (its ``rid``,
``origin_input_ids`` and ``output_ids`` so far). It must return the new logits for those rows.

Deserializing it runs the client's code in the engine, so it is off unless the engine is started with
``engine.enable_custom_logit_processor: true`` (SGLang's ``--enable-custom-logit-processor``).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

from agentrl.errors import AgentRLError

__all__ = ["ProcessorError", "RequestView", "load_processor"]

_CACHE: OrderedDict[str, Any] = OrderedDict()
_CACHE_SIZE = 64


class ProcessorError(AgentRLError, ValueError):
    """The string is not a serialized processor (or dill is not installed)."""


class RequestView:
    """What a processor may read of its request (the ``__req__`` entry of its params)."""

    def __init__(self, rid: str, origin_input_ids: list[int], output_ids: list[int]) -> None:
        self.rid = rid
        self.origin_input_ids = origin_input_ids
        self.output_ids = output_ids


def load_processor(serialized: str) -> Any:
    """The processor instance for a serialized class; cached per string."""
    if serialized in _CACHE:
        _CACHE.move_to_end(serialized)
        return _CACHE[serialized]
    try:
        import dill
    except ImportError as exc:
        raise ProcessorError("custom logit processors need dill: pip install 'agentrl[engine]'") from exc
    try:
        data = json.loads(serialized)
        cls = dill.loads(bytes.fromhex(data["callable"]))
        processor = cls() if isinstance(cls, type) else cls
    except Exception as exc:  # anything in a foreign pickle can fail; report it as bad input
        raise ProcessorError(f"cannot load the processor: {type(exc).__name__}: {exc}") from exc
    if not callable(processor):
        raise ProcessorError("the deserialized processor is not callable")
    _CACHE[serialized] = processor
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return processor
