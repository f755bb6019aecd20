"""Colocated mode's learner offload and onload: pinned host buffers reused across steps vs ``.to("cpu")``.

Between colocated steps the learner's states (bf16 parameters, float32 master weights, AdamW's two moments:
8 bytes per parameter on top of the 2) leave the device and come back. The learner builds a
:class:`~trainer.backend.TorchBackend` as ``agentrl run`` does on a GPU (bf16 with float32 masters), takes one
optimizer step so every state exists, then offloads and onloads ``--cycles`` times each way, interleaved:

- ``pageable``: each tensor ``.to(device)`` into freshly allocated pageable host memory (the old path);
- ``pinned``: the backend's :class:`~trainer.backend.host_stash.HostStash` (page-locked buffers allocated once,
  asynchronous copies, one wait).

Printed: seconds per offload and onload, the GB/s they reach, and pinned's speedup over pageable.

    python -m bench.offload --device cuda                      # Qwen2.5-0.5B shape

On CPU (a small model) the moves are no-ops; it runs so it cannot rot.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agentrl.config.learner import LossConfig, OptimConfig
from bench._timing import wall_seconds as timed
from bench.learner import SHAPES, make_model
from trainer.backend.host_stash import HostStash
from trainer.backend.torch_backend import TorchBackend
from trainer.losses import ppo_loss
from trainer.packing import Sample, pack


def state_bytes(backend: TorchBackend) -> int:
    tensors = [*backend.model.parameters(), *(backend.master.masters if backend.master is not None else [])]
    tensors += [v for st in backend.optimizer.state.values() for v in st.values() if v.dim() > 0]
    return sum(t.numel() * t.element_size() for t in tensors)


def one_step(backend: TorchBackend, vocab: int) -> None:
    rng = np.random.default_rng(0)
    samples = [Sample(tokens=rng.integers(10, vocab, 256), mask=np.r_[0.0, np.ones(255)].astype(np.float32),
                      behaviour_logprobs=np.zeros(256, np.float32), advantage=1.0) for _ in range(4)]
    backend.train_step([pack(samples, [0, 1, 2, 3])], ppo_loss, LossConfig())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None, help="qwen2.5-0.5b on CUDA, small on CPU")
    p.add_argument("--cycles", type=int, default=3)
    args = p.parse_args()
    device = torch.device(args.device)
    shape = args.shape or ("qwen2.5-0.5b" if device.type == "cuda" else "small")
    cuda = device.type == "cuda"
    backend = TorchBackend(make_model(shape, "sdpa_varlen", device), OptimConfig(),
                           device=device, bf16=cuda, master_weights=cuda)
    one_step(backend, int(SHAPES[shape]["vocab_size"]))  # type: ignore[call-overload]
    size = state_bytes(backend)
    ways = {"pageable": HostStash(pinned=False), "pinned": HostStash()}
    times: dict[tuple[str, str], list[float]] = {}
    for cycle in range(args.cycles + 1):  # the first cycle allocates the pinned buffers: not timed
        for name, stash in ways.items():
            backend.stash = stash
            off, on = timed(backend.offload), timed(backend.onload)
            if cycle:
                times.setdefault((name, "offload"), []).append(off)
                times.setdefault((name, "onload"), []).append(on)
    print(f"shape={shape} device={device} states {size / 2**30:.2f} GiB (bf16 parameters, float32 masters, AdamW "
          f"moments), pinned host buffers {ways['pinned'].host_bytes / 2**30:.2f} GiB, {args.cycles} cycles")
    for way in ("offload", "onload"):
        base, fast = (statistics.median(times[(n, way)]) for n in ("pageable", "pinned"))
        print(f"{way:>8}: pageable {base:.3f} s ({size / base / 1e9:.1f} GB/s), pinned {fast:.3f} s "
              f"({size / fast / 1e9:.1f} GB/s): {base / fast:.2f}x")


if __name__ == "__main__":
    main()
