import torch
import torch.nn as nn
import triton
import triton.language as tl


@triton.jit
def sq_diff_sum_kernel(x_ptr, y_ptr, partial_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    d = tl.load(x_ptr + offs, mask=mask, other=0.0) - tl.load(y_ptr + offs, mask=mask, other=0.0)
    tl.store(partial_ptr + tl.program_id(0), tl.sum(d * d, axis=0))


@triton.jit
def finish_kernel(partial_ptr, out_ptr, parts, n, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, parts, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(partial_ptr + offs, mask=offs < parts, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0) / n)


class ModelNew(nn.Module):
    def forward(self, x, y):
        n = x.numel()
        block = 4096
        parts = triton.cdiv(n, block)
        partial = torch.empty(parts, device=x.device, dtype=torch.float32)
        out = torch.empty((), device=x.device, dtype=x.dtype)
        sq_diff_sum_kernel[(parts,)](x, y, partial, n, BLOCK=block)
        finish_kernel[(1,)](partial, out, parts, n, BLOCK=1024)
        return out
