import torch
import torch.nn as nn

# small sizes for the CPU interpreter (TRITON_INTERPRET=1), GPU-sized under CUDA; neither is a block multiple
M, K = (16384, 8192) if torch.cuda.is_available() else (50, 70)
KERNELGEN = {"atol": 2e-2, "rtol": 2e-2}  # tl.dot may use TF32 on GPU, as torch does with its flag on


class Model(nn.Module):
    """Matrix-vector product of an (M, K) matrix and a (K,) vector."""

    def forward(self, a, v):
        return torch.mv(a, v)


def get_inputs():
    return [torch.randn(M, K), torch.randn(K)]


def get_init_inputs():
    return []
