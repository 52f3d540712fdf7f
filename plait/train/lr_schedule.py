"""The learning-rate schedule. (AdamW itself runs on sharded masters in parallel/zero.py.)"""

from __future__ import annotations

import math

from plait.config import OptimConfig, TrainConfig


def lr_at(step: int, optim: OptimConfig, train: TrainConfig) -> float:
    """Linear warmup over warmup_steps, then cosine decay from lr to min_lr at the last step."""
    if optim.warmup_steps and step <= optim.warmup_steps:
        return optim.lr * step / optim.warmup_steps
    decay_steps = max(1, train.steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / decay_steps)
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1 + math.cos(math.pi * progress))
