"""The optimizer the ZeRO engine runs on its owned parameter segments, chosen by `optim.name`.

- adamw: torch.optim.AdamW (fused on CUDA, foreach on CPU);
- sgd: torch.optim.SGD with `optim.momentum` (weight decay as SGD's L2 term);
- galore: GaLore (parallel/galore.py) around AdamW: 2-D weights whose smaller side exceeds
  `optim.rank` keep their Adam moments in a rank-r projection of the gradient; the rest
  (norms, small matrices) get plain AdamW.

Elementwise optimizers keep state of the parameter's shape, so the engine can slice it per
ZeRO shard and gather it into full tensors for checkpoints (`ELEMENTWISE_STATE`). GaLore's
state (projections, projected moments) is not elementwise: it needs whole, unsharded
matrices, which config validation guarantees (ZeRO 0, no tensor parallelism).
"""

from __future__ import annotations

import torch
from torch import nn

from plait.config import OptimConfig
from plait.parallel.galore import GaLore

# The per-element state tensors of each elementwise optimizer, by optim.name.
ELEMENTWISE_STATE = {"adamw": ("exp_avg", "exp_avg_sq"), "sgd": ("momentum_buffer",)}


def build_optimizer(optim: OptimConfig, decay: list[nn.Parameter], no_decay: list[nn.Parameter],
                    device: torch.device) -> torch.optim.Optimizer:
    """An optimizer over the engine's segment parameters: `decay` (matrices) and `no_decay`."""
    if optim.name == "adamw":
        groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused = device.type == "cuda"
        return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps,
                                 fused=fused, foreach=None if fused else True)
    if optim.name == "sgd":
        groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, foreach=True)
    if optim.name == "galore":
        projected = [p for p in decay if p.dim() == 2 and min(p.shape) > optim.rank]
        chosen = {id(p) for p in projected}
        plain_decay = [p for p in decay if id(p) not in chosen]
        groups = [{"params": projected, "rank": optim.rank, "weight_decay": optim.weight_decay},
                  {"params": plain_decay, "rank": None, "weight_decay": optim.weight_decay},
                  {"params": no_decay, "rank": None, "weight_decay": 0.0}]
        return GaLore([g for g in groups if g["params"]], base="adamw", lr=optim.lr,
                      update_proj_gap=optim.update_proj_gap, scale=optim.scale, betas=optim.betas, eps=optim.eps)
    raise ValueError(f"unknown optimizer {optim.name!r}")
