"""The SwiGLU MLP, shared by the dense blocks (plait.model.llama) and MoE's experts (plait.model.moe).

It lives apart from llama.py so that moe.py can build on it while llama.py builds on moe.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation: silu(gate) * up."""
    return F.silu(gate) * up


class SwiGLU(nn.Module):
    activation = staticmethod(swiglu)  # plait.kernels swaps in a fused one per instance

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.w_gate = nn.Linear(dim, ffn_dim, bias=False)
        self.w_up = nn.Linear(dim, ffn_dim, bias=False)
        self.w_down = nn.Linear(ffn_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(self.activation(self.w_gate(x), self.w_up(x)))
