"""Page-locked host copies of a learner's device states, for colocated mode's offload and onload.

``tensor.to("cpu")`` copies into freshly allocated pageable memory: the driver stages every byte through a bounce
buffer and the copy blocks, a few GB/s. A :class:`HostStash` keeps one pinned host tensor per state (same shape,
dtype and strides), allocated on the first offload and reused by every later one, so both directions are
asynchronous DMA copies queued back to back and waited for once: offload copies device → pinned and hands the
device memory back; onload allocates on the device and copies pinned → device. The host memory is held for the
run (as the pageable copies were while offloaded), in exchange for copies at the link's speed.

Keys name a state across moves (a parameter's name, an optimizer state's parameter index and slot); a key whose
tensor changed shape or dtype gets a new buffer. ``pinned=False`` copies through ``.to()`` (the old path, kept
for benchmarks and for hosts without CUDA).
"""

from __future__ import annotations

import logging

import torch

__all__ = ["HostStash"]

log = logging.getLogger(__name__)


class HostStash:
    """Pinned host buffers by key; :meth:`move` puts a tensor's data on ``where`` (call :meth:`wait` after a batch)."""

    def __init__(self, *, pinned: bool = True) -> None:
        self.pinned = pinned and torch.cuda.is_available()
        self._host: dict[str, torch.Tensor] = {}

    @property
    def host_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._host.values())

    def move(self, key: str, tensor: torch.Tensor, where: torch.device) -> torch.Tensor:
        """``tensor`` on ``where``: into ``key``'s pinned buffer when going to the host, a fresh device tensor
        when coming back. The copy may still be running: :meth:`wait` before reading or freeing the source."""
        if tensor.device == where:
            return tensor
        if not self.pinned:
            return tensor.to(where)
        if where.type == "cpu":
            host = self._host.get(key)
            if host is None or (host.shape, host.dtype, host.stride()) != (tensor.shape, tensor.dtype, tensor.stride()):
                try:
                    host = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, pin_memory=True)
                except RuntimeError as exc:  # the host cannot lock that much memory: pageable from here on
                    log.warning("HostStash: cannot pin %.1f GiB more host memory (%s); offloading to pageable "
                                "memory from now on", tensor.numel() * tensor.element_size() / 2**30, exc)
                    self.pinned = False
                    return tensor.to(where)
                self._host[key] = host
            host.copy_(tensor, non_blocking=True)
            return host
        out = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device=where)
        out.copy_(tensor, non_blocking=tensor.is_pinned())
        return out

    def wait(self, device: torch.device) -> None:
        """Block until the queued copies on ``device`` are done."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
