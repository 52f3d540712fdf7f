"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedule.

Optimizer state is exported keyed by parameter name, not by position in the optimizer,
so a checkpoint does not depend on how parameters were grouped or sharded.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from plait.config import OptimConfig, TrainConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    # Norm weights (1-D) are not decayed: decay would pull their scale towards zero.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = device.type == "cuda"
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
        fused=fused, foreach=None if fused else True,
    )


def lr_at(step: int, optim: OptimConfig, train: TrainConfig) -> float:
    """Linear warmup over warmup_steps, then cosine decay from lr to min_lr at the last step."""
    if optim.warmup_steps and step <= optim.warmup_steps:
        return optim.lr * step / optim.warmup_steps
    decay_steps = max(1, train.steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / decay_steps)
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def optimizer_state_by_name(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    names = {id(p): name for name, p in model.named_parameters()}
    return {
        names[id(p)]: {k: v.detach().cpu().clone() for k, v in optimizer.state[p].items()}
        for group in optimizer.param_groups for p in group["params"] if p in optimizer.state
    }


def load_optimizer_state_by_name(
    optimizer: torch.optim.Optimizer, model: nn.Module, state: dict[str, dict[str, Any]]
) -> None:
    """Load name-keyed state through the optimizer's own loader, which casts it to each parameter."""
    names = {id(p): name for name, p in model.named_parameters()}
    ordered = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    missing = [name for name in ordered if name not in state]
    if missing:
        raise KeyError(f"optimizer state is missing parameters: {', '.join(missing[:3])}")
    current = optimizer.state_dict()
    current["state"] = {index: state[name] for index, name in enumerate(ordered)}
    optimizer.load_state_dict(current)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for state in optimizer.state.values() for v in state.values()
        if torch.is_tensor(v) and v.ndim > 0
    )
