import torch
import torch.nn as nn

# small sizes for the CPU interpreter (TRITON_INTERPRET=1), GPU-sized under CUDA; neither is a block multiple
M, K, N = (4096, 4096, 4096) if torch.cuda.is_available() else (64, 48, 40)
KERNELGEN = {"atol": 2e-2, "rtol": 2e-2}  # tl.dot may use TF32 on GPU, as torch does with its flag on


class Model(nn.Module):
    """Matrix product A @ B of an (M, K) and a (K, N) matrix."""

    def forward(self, a, b):
        return torch.matmul(a, b)


def get_inputs():
    return [torch.randn(M, K), torch.randn(K, N)]


def get_init_inputs():
    return []
