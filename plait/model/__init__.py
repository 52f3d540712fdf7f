"""Plain PyTorch model code: no parallelism in here (that is applied from plait/parallel)."""

from __future__ import annotations

import torch

from plait.config import ModelConfig
from plait.model.init import init_parameters
from plait.model.llama import Transformer, count_parameters


def build_model(cfg: ModelConfig, seed: int, device: torch.device | str = "cpu") -> Transformer:
    """Build on the meta device, materialise on `device`, then initialise from (seed, name, shape)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=device)
    if cfg.tie_embeddings:  # to_empty re-creates parameters, so the tie must be re-made
        model.lm_head.weight = model.embed.weight
    init_parameters(model, seed, cfg)
    return model


__all__ = ["Transformer", "build_model", "count_parameters"]
