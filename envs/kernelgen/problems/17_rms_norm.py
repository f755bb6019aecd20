import torch
import torch.nn as nn

# small sizes for the CPU interpreter (TRITON_INTERPRET=1), GPU-sized under CUDA; neither is a block multiple
ROWS, COLS = (4096, 8191) if torch.cuda.is_available() else (16, 300)


class Model(nn.Module):
    """RMSNorm over the last dimension: x / sqrt(mean(x^2) + eps) * weight (eps 1e-6)."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(dim) + 0.5)
        self.eps = 1e-6

    def forward(self, x):
        return x * torch.rsqrt(torch.mean(x * x, dim=-1, keepdim=True) + self.eps) * self.weight


def get_inputs():
    return [torch.randn(ROWS, COLS)]


def get_init_inputs():
    return [COLS]
