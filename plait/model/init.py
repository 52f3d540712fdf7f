"""Layout-invariant initialisation: each parameter's values depend only on the seed, its
full name and its shape.

Every parameter gets its own random stream, seeded from a hash of (seed, name, shape), so
the same tensor comes out whichever rank builds it, in whatever order, and whatever part of
the model a rank holds. A sharded parameter is initialised by generating the full tensor
with `init_tensor` and taking its slice.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from plait.config import ModelConfig

INIT_STD = 0.02


def parameter_seed(seed: int, name: str, shape: tuple[int, ...]) -> int:
    digest = hashlib.sha256(f"{seed}|{name}|{tuple(shape)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def init_std(name: str, cfg: ModelConfig) -> float | None:
    """Standard deviation of a normal init for `name`; None means ones (norm weights).

    Output projections of each residual branch are scaled by 1/sqrt(2 n_layers) so the
    residual stream's variance does not grow with depth (GPT-2 / Megatron practice).
    """
    if name.endswith("norm.weight"):
        return None
    if name.endswith(("attn.wo.weight", "w_down.weight", "experts.w_down")):  # experts' too
        return INIT_STD / math.sqrt(2 * cfg.n_layers)
    return INIT_STD


def init_tensor(seed: int, name: str, shape: tuple[int, ...], cfg: ModelConfig) -> torch.Tensor:
    """The full fp32 initial value of parameter `name` (on CPU)."""
    std = init_std(name, cfg)
    if std is None:
        return torch.ones(shape)
    generator = torch.Generator().manual_seed(parameter_seed(seed, name, shape))
    return torch.randn(shape, generator=generator) * std


@torch.no_grad()
def init_parameters(model: nn.Module, seed: int, cfg: ModelConfig) -> None:
    """Fill every parameter in place; works on a model materialised from the meta device."""
    for name, param in model.named_parameters():  # a tied weight is visited once, under its first name
        param.copy_(init_tensor(seed, name, tuple(param.shape), cfg).to(param.device, param.dtype))
