"""Model FLOPs per token and device peaks, for MFU.

MFU = tokens/s x (6N + 12 L d s) / (devices x peak), with N every parameter (the PaLM /
Llama 3 definition: 6N for the matrix multiplies of forward and backward, 12 L d s for
attention scores and values). Peaks come from plait/hardware.py, the table the planner uses too.
"""

from __future__ import annotations

import warnings

import torch

from plait.config import ModelConfig
from plait.hardware import accelerator_named


def flops_per_token(cfg: ModelConfig, n_params: int) -> float:
    return 6.0 * n_params + 12.0 * cfg.n_layers * cfg.dim * cfg.seq_len


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    accelerator = accelerator_named(name)
    if accelerator is not None:
        return accelerator.peak_flops
    warnings.warn(f"no peak FLOP/s known for device '{name}'; mfu will be null", stacklevel=2)
    return None
