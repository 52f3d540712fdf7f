"""Swap the fused Triton kernels into a model, module by module.

The model's RMSNorm, SwiGLU and Attention call their work through a per-instance function
(`norm`, `activation`, `rotary`); this sets that instance attribute on every such module,
subclasses included (tensor parallel's ParallelRegionNorm, MoE's shared-expert SwiGLU).
MoE's stacked routed experts are not SwiGLU modules and keep their own code.

Each fused function falls back to the reference by itself where the kernels cannot run
(CPU without TRITON_INTERPRET=1, unsupported shapes), so installing is always safe.
Install after any parallel wrapping that *replaces* modules (tensor parallel swaps each
RMSNorm for a new ParallelRegionNorm, which would start again from the class default).
"""

from __future__ import annotations

from torch import nn

from plait.kernels.availability import triton_importable
from plait.model.llama import Attention, RMSNorm
from plait.model.mlp import SwiGLU

# The fused modules import triton, an optional dependency: without it (or with a broken
# install) they are not imported and every model keeps the reference path.
if triton_importable():
    from plait.kernels.rmsnorm import fused_rms_norm
    from plait.kernels.rotary import fused_apply_rotary
    from plait.kernels.swiglu import fused_swiglu


def install_fused_kernels(model: nn.Module) -> dict[str, int]:
    """Point every RMSNorm, SwiGLU and Attention of `model` at the fused ops; counts by kind.

    Without triton nothing is installed (all counts 0) and the model keeps the reference.
    """
    counts = {"rms_norm": 0, "swiglu": 0, "rotary": 0}
    if not triton_importable():
        return counts
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.norm = fused_rms_norm
            counts["rms_norm"] += 1
        elif isinstance(module, SwiGLU):
            module.activation = fused_swiglu
            counts["swiglu"] += 1
        elif isinstance(module, Attention):
            module.rotary = fused_apply_rotary
            counts["rotary"] += 1
    return counts
