import torch
import torch.nn as nn

# small sizes for the CPU interpreter (TRITON_INTERPRET=1), GPU-sized under CUDA; neither is a block multiple
BATCH, IN, OUT = (4096, 4096, 4096) if torch.cuda.is_available() else (37, 48, 40)
KERNELGEN = {"atol": 2e-2, "rtol": 2e-2}  # tl.dot may use TF32 on GPU, as torch does with its flag on


class Model(nn.Module):
    """Linear layer followed by ReLU."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, x):
        return torch.relu(self.linear(x))


def get_inputs():
    return [torch.randn(BATCH, IN)]


def get_init_inputs():
    return [IN, OUT]
