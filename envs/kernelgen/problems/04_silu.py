import torch
import torch.nn as nn
import torch.nn.functional as F

# small sizes for the CPU interpreter (TRITON_INTERPRET=1), GPU-sized under CUDA; neither is a block multiple
N = (1 << 24) + 3 if torch.cuda.is_available() else 1000


class Model(nn.Module):
    """SiLU (swish): x * sigmoid(x)."""

    def forward(self, x):
        return F.silu(x)


def get_inputs():
    return [torch.randn(N)]


def get_init_inputs():
    return []
