"""Fused SwiGLU activation: silu(gate) * up in one pass, recomputed in backward.

`fused_swiglu(gate, up)` equals `plait.model.mlp.swiglu` (silu in gate's dtype, the
product in the promoted dtype). Eager PyTorch keeps silu(gate) alive for backward, one
more [tokens, ffn] activation per layer (for the 1.36B shape 8 x 2048 x 5632 bf16 = 185 MB
a layer); here only gate and up are saved and silu is recomputed from gate in backward,
which costs no extra memory traffic since backward reads gate anyway.

The ops are `torch.ops.plait.swiglu` and `plait.swiglu_backward`: opaque to torch.compile.
Elementwise over the flattened tensors in blocks of 1024 (int64 offsets).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from plait.kernels.availability import kernel_device_types, on_device
from plait.model.mlp import swiglu

_KERNEL_DEVICES = kernel_device_types()
BLOCK = 1024
NUM_WARPS = 4  # 8 elements per thread: wide enough loads, plenty of programs on large tensors
# The kernels compute in fp32: float64 inputs keep the reference rather than lose precision.
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _swiglu_forward_kernel(GATE, UP, OUT, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    gate = tl.load(GATE + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(UP + offsets, mask=mask, other=0.0).to(tl.float32)
    # silu is rounded to gate's dtype before the product, as F.silu(gate) * up is.
    act = (gate * tl.sigmoid(gate)).to(GATE.dtype.element_ty).to(tl.float32)
    tl.store(OUT + offsets, (act * up).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(GRAD, GATE, UP, GRAD_GATE, GRAD_UP, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    grad = tl.load(GRAD + offsets, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(GATE + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(UP + offsets, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    act = (gate * sig).to(GATE.dtype.element_ty).to(tl.float32)
    tl.store(GRAD_UP + offsets, (grad * act).to(GRAD_UP.dtype.element_ty), mask=mask)
    # The reference forms grad * up in the output dtype before silu's backward.
    grad_act = (grad * up).to(GRAD.dtype.element_ty).to(tl.float32)
    # silu'(g) = sigmoid(g) * (1 + g * (1 - sigmoid(g)))
    grad_gate = grad_act * sig * (1.0 + gate * (1.0 - sig))
    tl.store(GRAD_GATE + offsets, grad_gate.to(GRAD_GATE.dtype.element_ty), mask=mask)


@torch.library.custom_op("plait::swiglu", mutates_args=())
def swiglu_op(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up for same-shaped gate and up; `fused_swiglu` is the public entry."""
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty(gate.shape, dtype=torch.result_type(gate, up), device=gate.device)
    n = gate.numel()
    if n:
        with on_device(gate.device):
            _swiglu_forward_kernel[(triton.cdiv(n, BLOCK),)](gate, up, out, n, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out


@swiglu_op.register_fake
def _(gate: Tensor, up: Tensor) -> Tensor:
    return gate.new_empty(gate.shape, dtype=torch.result_type(gate, up))


@torch.library.custom_op("plait::swiglu_backward", mutates_args=())
def swiglu_backward_op(grad_out: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """(grad_gate in gate's dtype, grad_up in up's dtype)."""
    grad_out, gate, up = grad_out.contiguous(), gate.contiguous(), up.contiguous()
    grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    if n:
        with on_device(gate.device):
            _swiglu_backward_kernel[(triton.cdiv(n, BLOCK),)](
                grad_out, gate, up, grad_gate, grad_up, n, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return grad_gate, grad_up


@swiglu_backward_op.register_fake
def _(grad_out: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_out: Tensor):
    gate, up = ctx.saved_tensors
    return swiglu_backward_op(grad_out, gate, up)


swiglu_op.register_autograd(_backward, setup_context=_setup_context)


def fused_swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """`swiglu` through the Triton kernels where they run, else the reference itself."""
    if (gate.device.type not in _KERNEL_DEVICES or up.device != gate.device or gate.shape != up.shape
            or gate.dtype not in _DTYPES or up.dtype not in _DTYPES):
        return swiglu(gate, up)
    return swiglu_op(gate, up)
