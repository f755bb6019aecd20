import torch
import torch.nn as nn

# small sizes for the CPU interpreter (TRITON_INTERPRET=1), GPU-sized under CUDA; neither is a block multiple
N = (1 << 24) + 3 if torch.cuda.is_available() else 1000


class Model(nn.Module):
    """Fused relu(x + y) * z."""

    def forward(self, x, y, z):
        return torch.relu(x + y) * z


def get_inputs():
    return [torch.randn(N), torch.randn(N), torch.randn(N)]


def get_init_inputs():
    return []
