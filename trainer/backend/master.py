"""float32 master weights for a model whose parameters are bf16 (``learner.precision: bf16_master``).

The model computes in bf16 end to end (no autocast: no fp32 -> bf16 weight copies on every use); the optimizer
owns float32 copies of the trainable parameters. Each parameter's bf16 gradient is added into its master's
float32 ``.grad`` as soon as the backward pass has produced it, and the bf16 gradient is dropped: over many
micro-batches the sum keeps float32 precision (bf16 accumulation rounds the running sum to 8 bits of
mantissa at every micro-batch) and no bf16 gradient outlives its backward. After the optimizer steps the
masters, :meth:`MasterWeights.publish` rounds them back into the bf16 parameters.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["MasterWeights"]


class MasterWeights:
    """float32 masters of ``params`` (bf16 leaf parameters), ordered as given; pass :attr:`masters` to the
    optimizer. ``initial`` (same order) seeds the masters with more precision than the bf16 values hold, e.g.
    the float32 weights the model was cast from; float32 tensors on the parameters' device are taken over, not
    copied. A parameter that is not bf16, or an ``initial`` of the wrong length or shape, is a ValueError."""

    def __init__(self, params: list[torch.nn.Parameter], initial: list[torch.Tensor] | None = None) -> None:
        _check(params, initial)
        sources = initial if initial is not None else [p.detach() for p in params]
        self.params = params
        self.masters = [torch.nn.Parameter(s.detach().to(p.device, torch.float32))
                        for p, s in zip(params, sources, strict=True)]
        for param, master in zip(params, self.masters, strict=True):
            param.register_post_accumulate_grad_hook(self._accumulator(master))

    @staticmethod
    def _accumulator(master: torch.nn.Parameter) -> Callable[[torch.Tensor], None]:
        def accumulate(param: torch.Tensor) -> None:
            if param.grad is None:
                return
            if master.grad is None:
                master.grad = param.grad.to(torch.float32)
            else:
                master.grad.add_(param.grad)
            param.grad = None

        return accumulate

    @torch.no_grad()
    def publish(self) -> None:
        """Round the masters into the bf16 parameters (after each optimizer step and each restore)."""
        for param, master in zip(self.params, self.masters, strict=True):
            param.copy_(master)

    @torch.no_grad()
    def load(self, values: list[torch.Tensor]) -> None:
        """Set the masters (same order as the parameters) and publish them."""
        for master, value in zip(self.masters, values, strict=True):
            master.copy_(value)
        self.publish()


def _check(params: list[torch.nn.Parameter], initial: list[torch.Tensor] | None) -> None:
    wrong = [tuple(p.shape) for p in params if p.dtype != torch.bfloat16]
    if wrong:
        raise ValueError(f"MasterWeights: parameters must be bfloat16; {len(wrong)} are not (shapes {wrong[:3]})")
    if initial is None:
        return
    if len(initial) != len(params):
        raise ValueError(f"MasterWeights: {len(initial)} initial tensors for {len(params)} parameters")
    for i, (p, t) in enumerate(zip(params, initial, strict=True)):
        if t.shape != p.shape:
            raise ValueError(f"MasterWeights: initial tensor {i} has shape {tuple(t.shape)}, the parameter "
                             f"{tuple(p.shape)}")
