"""Reading a Hugging Face checkpoint's tensors and writing one (config + safetensors), without building a model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from agentrl.errors import ConfigError

__all__ = ["read_hf_tensors", "write_hf"]

_CONFIG_FILES = ("config.json", "generation_config.json")


def read_hf_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the ``*.safetensors`` files in ``model_dir`` (CPU)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ConfigError(f"config key learner.model: {model_dir} has no *.safetensors files")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def write_hf(tensors: dict[str, torch.Tensor], base_dir: Path, dest: Path, dtype: torch.dtype) -> None:
    """Write ``tensors`` (as ``dtype``) to ``dest/model.safetensors`` next to the base model's config files."""
    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(dest / "model.safetensors"),
              metadata={"format": "pt"})
    for name in _CONFIG_FILES:
        src = Path(base_dir) / name
        if src.is_file():
            shutil.copy2(src, dest / name)
    config = json.loads((dest / "config.json").read_text())
    config["torch_dtype"] = config["dtype"] = str(dtype).removeprefix("torch.")
    (dest / "config.json").write_text(json.dumps(config, indent=2))
