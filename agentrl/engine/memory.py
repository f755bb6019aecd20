"""Colocated mode: hand the engine's memory back while a learner trains on the same device, then take it again.

SGLang's ``/release_memory_occupation`` and ``/resume_memory_occupation`` with tags ``kv_cache``, ``weights``
and ``cuda_graph`` (no tags: all three):

- ``kv_cache``: the KV pool is freed and the prefix cache emptied; it comes back zeroed.
- ``weights``: the parameters move out of device memory and come back unchanged (a CPU copy on CUDA; a file
  in a temporary directory on CPU, so the process's resident memory really drops). A learner normally
  loads new weights right after resuming (``/update_weights_from_tensor`` or ``/update_weights_from_disk``).
- ``cuda_graph``: the captured decode graphs are dropped (decoding runs eagerly); releasing the KV pool or the
  weights drops them too, since they point into both. They are captured again once all three are back.

While the KV pool or the weights are released nothing is admitted (requests queue); release is refused while
requests run. Every call here runs on the model thread.
"""

from __future__ import annotations

import ctypes
import logging
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["MEMORY_TAGS", "MemoryManager"]

MEMORY_TAGS = ("kv_cache", "weights", "cuda_graph")

log = logging.getLogger(__name__)


class MemoryManager:
    """Releases and restores one runner's KV pool, its model's weights and its CUDA graphs."""

    def __init__(self, runner: Any, graph_sizes: Sequence[int] | None) -> None:
        self.runner = runner
        self.model = runner.model
        self.graph_sizes = list(graph_sizes) if graph_sizes else None  # None: graphs were never captured
        self.released: set[str] = set()
        self.releases = 0  # release calls that freed something
        self.resumes = 0  # resumes after which nothing was released any more (a multi-stage resume counts once)
        self._cpu_copy: dict[str, torch.Tensor] = {}
        self._spill: Path | None = None

    def release(self, tags: Iterable[str]) -> None:
        tags = set(tags) - self.released
        self.releases += bool(tags)
        if tags & {"kv_cache", "weights"} or "cuda_graph" in tags:
            self.runner.drop_cuda_graphs()
        if "kv_cache" in tags:
            self.runner.release_kv()
        if "weights" in tags:
            self._stash_weights()
        self.released |= tags
        self._return_memory()

    def resume(self, tags: Iterable[str]) -> None:
        tags = set(tags) & self.released
        if "weights" in tags:
            self._restore_weights()
        if "kv_cache" in tags:
            self.runner.allocate_kv()
        self.released -= tags
        self.resumes += bool(tags) and not self.released
        if not self.released and self.graph_sizes and not self.runner.has_cuda_graphs:
            self.runner.capture_cuda_graphs(self.graph_sizes)

    def _params(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.model.named_parameters())  # tied parameters appear once

    def _stash_weights(self) -> None:
        params = self._params()
        if self.runner.device.type == "cuda":
            self._cpu_copy = {name: p.data.to("cpu", copy=True) for name, p in params.items()}
        else:
            self._spill = Path(tempfile.mkdtemp(prefix="agentrl-weights-"))
            torch.save({name: p.data for name, p in params.items()}, self._spill / "weights.pt")
        for p in params.values():
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        self.runner.drop_packed()  # the packed projections hold the weights too

    def _restore_weights(self) -> None:
        params = self._params()
        if self._spill is not None:
            saved = torch.load(self._spill / "weights.pt", weights_only=True)
            shutil.rmtree(self._spill, ignore_errors=True)
            self._spill = None
        else:
            saved, self._cpu_copy = self._cpu_copy, {}
        for name, p in params.items():
            p.data = saved[name].to(self.runner.device)

    def _return_memory(self) -> None:
        """Give freed memory back to the device / the OS, so another process can use it."""
        if self.runner.device.type == "cuda":
            torch.cuda.empty_cache()
            return
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:  # not glibc: large blocks are unmapped anyway
            log.debug("malloc_trim unavailable")
