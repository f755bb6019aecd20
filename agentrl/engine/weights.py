"""Load a Hugging Face model directory for serving, and new weights for an in-place update.

Errors are :class:`~agentrl.errors.EngineError` naming the path and what is wrong with it, so a missing or
broken model directory stops ``agentrl engine`` with one clear line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from agentrl.errors import EngineError

__all__ = ["LoadedModel", "copy_weights", "eos_token_ids", "load_model", "read_state_dict", "resolve_device"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LoadedModel:
    """A model, its tokenizer and where they came from."""

    def __init__(self, model: Any, tokenizer: Any, path: Path) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.path = path


def resolve_device(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """``auto`` picks CUDA when available; dtype ``auto`` is float32 on CPU and bfloat16 on CUDA."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise EngineError(f"device {device!r} is not a valid torch device") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"device {device!r} requested but CUDA is not available")
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise EngineError(f"dtype {dtype!r} is not one of auto, {', '.join(_DTYPES)}")
    return dev, _DTYPES[dtype]


def _check_dir(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise EngineError(f"model path {p} is not a directory")
    if not (p / "config.json").is_file():
        raise EngineError(f"model path {p} has no config.json (not a Hugging Face model directory)")
    return p


def load_model(path: str | Path, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """Load model + tokenizer from a Hugging Face directory, in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = _check_dir(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(p)
    except Exception as exc:
        raise EngineError(f"model path {p}: cannot load the tokenizer: {exc}") from exc
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(p, dtype=dtype)
    except Exception as exc:
        raise EngineError(f"model path {p}: cannot load the model: {exc}") from exc
    model.to(device).eval()
    model.requires_grad_(False)
    return LoadedModel(model, tokenizer, p)


def eos_token_ids(loaded: LoadedModel) -> set[int]:
    """End tokens: the generation config's ``eos_token_id`` (int or list) plus the tokenizer's."""
    ids: set[int] = set()
    for source in (getattr(loaded.model, "generation_config", None), loaded.model.config):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list):
            ids.update(int(e) for e in eos)
    if loaded.tokenizer.eos_token_id is not None:
        ids.add(int(loaded.tokenizer.eos_token_id))
    return ids


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the ``*.safetensors`` (or ``*.bin``) files of a model directory, on CPU."""
    p = _check_dir(path)
    files = sorted(p.glob("*.safetensors"))
    state: dict[str, torch.Tensor] = {}
    if files:
        from safetensors.torch import load_file

        for f in files:
            state.update(load_file(f))
        return state
    for f in sorted(p.glob("*.bin")):
        state.update(torch.load(f, map_location="cpu", weights_only=True))
    if not state:
        raise EngineError(f"model path {p} has no *.safetensors or *.bin weight files")
    return state


def copy_weights(model: Any, state: dict[str, torch.Tensor], *, partial: bool = False) -> None:
    """Copy ``state`` into the model's parameters in place (addresses stay, so captured graphs stay valid).

    Every parameter must be present (tied weights may be omitted; with ``partial`` any subset may be given),
    each with its parameter's shape; otherwise raises :class:`EngineError` before anything is changed.
    """
    params = dict(model.named_parameters())
    missing = [] if partial else [n for n in params if n not in state and not _is_tied(model, n)]
    unknown = [n for n in state if n not in params and not _is_tied(model, n)]
    wrong = [n for n, t in state.items() if n in params and tuple(t.shape) != tuple(params[n].shape)]
    if missing or wrong or unknown:
        raise EngineError(
            f"weights do not fit the served model: missing={missing[:5]} shape mismatch={wrong[:5]} "
            f"unknown={unknown[:5]}"
        )
    with torch.no_grad():
        for name, tensor in state.items():
            if name in params:  # a tied lm_head.weight is the embedding's parameter: skip the duplicate
                params[name].copy_(tensor.to(params[name].device, params[name].dtype))


def _is_tied(model: Any, name: str) -> bool:
    return name == "lm_head.weight" and bool(getattr(model.config, "tie_word_embeddings", False))
