import torch
import torch.nn as nn

# small sizes for the CPU interpreter (TRITON_INTERPRET=1), GPU-sized under CUDA; neither is a block multiple
ROWS, COLS = (4096, 8191) if torch.cuda.is_available() else (16, 300)
KERNELGEN = {"atol": 1e-3, "rtol": 1e-3}


class Model(nn.Module):
    """Mean squared error between two tensors (a scalar)."""

    def forward(self, x, y):
        return torch.mean((x - y) ** 2)


def get_inputs():
    return [torch.randn(ROWS, COLS), torch.randn(ROWS, COLS)]


def get_init_inputs():
    return []
