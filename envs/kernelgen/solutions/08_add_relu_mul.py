import torch
import torch.nn as nn
import triton
import triton.language as tl


@triton.jit
def add_relu_mul_kernel(x_ptr, y_ptr, z_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    y = tl.load(y_ptr + offs, mask=mask)
    z = tl.load(z_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, tl.maximum(x + y, 0.0) * z, mask=mask)


class ModelNew(nn.Module):
    """One pass over memory instead of eager PyTorch's three."""

    def forward(self, x, y, z):
        out = torch.empty_like(x)
        n = out.numel()
        add_relu_mul_kernel[(triton.cdiv(n, 1024),)](x, y, z, out, n, BLOCK=1024)
        return out
