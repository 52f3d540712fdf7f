"""Model FLOPs per token and device peaks, for MFU.

MFU = tokens/s x (6N + 12 L d s) / (devices x peak), with N every parameter (the PaLM /
Llama 3 definition: 6N for the matrix multiplies of forward and backward, 12 L d s for
attention scores and values). Peaks are dense bf16 datasheet figures. A device that is not
in the table has no MFU: it is reported as null, never guessed.
"""

from __future__ import annotations

import warnings

import torch

from plait.config import ModelConfig

# Matched in order against torch.cuda.get_device_name(); the first substring that appears wins.
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989.5e12),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("H200", 989.5e12),  # SXM; also matches GH200, whose GPU has the same peak
    ("A100", 312e12),
    ("B200", 2250e12),
    ("MI250X", 383e12),
    ("MI300X", 1307.4e12),
]


def flops_per_token(cfg: ModelConfig, n_params: int) -> float:
    return 6.0 * n_params + 12.0 * cfg.n_layers * cfg.dim * cfg.seq_len


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_FLOPS:
        if key in name:
            return peak
    warnings.warn(f"no peak FLOP/s known for device '{name}'; mfu will be null", stacklevel=2)
    return None
