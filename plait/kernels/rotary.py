"""Fused rotary position embedding for x [batch, heads, seq, head_dim] (rotate-half convention).

`fused_apply_rotary(x, cos, sin)` equals `plait.model.llama.apply_rotary`: with x1, x2 the two
halves of the last dim and c, s split the same way,
    out = cat(x1 * c1 - x2 * s1, x2 * c2 + x1 * s2)        computed in fp32, cast to x's dtype.
Backward applies the transposed map to the gradient g (the inverse rotation when the two
halves of the tables hold the same angles, as `rotary_tables` builds them):
    grad_x = cat(g1 * c1 + g2 * s2, g2 * c2 - g1 * s1).
Eager PyTorch materialises x * cos, rotate_half(x) and its product in fp32 (three fp32
copies of q and k); here one pass reads x and writes the output, and backward needs only
cos and sin (x is not saved).

One program handles one (batch, position) for all heads, so each row of cos/sin is read
once per program rather than once per head. x may have any strides (q and k come from
view(...).transpose(1, 2)); the output is contiguous [batch, heads, seq, head_dim].
The op is `torch.ops.plait.rotary` (its own backward with inverse=True): opaque to
torch.compile. cos and sin get no gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from plait.kernels.availability import kernel_device_types, num_warps_for, on_device
from plait.model.llama import apply_rotary

_KERNEL_DEVICES = kernel_device_types()
# heads x half-head-dim elements held by one program. Compiled for sm_90 a tile of 8192
# (128 heads of 128) takes 84 registers a thread at 16 warps; twice that spills, so larger
# tiles keep the reference.
MAX_TILE = 8192
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # fp32 compute: float64 keeps the reference


@triton.jit
def _rotary_kernel(X, COS, SIN, OUT, n_heads, seq, half,
                   x_stride_b, x_stride_h, x_stride_s, x_stride_d,
                   out_stride_b, out_stride_h, out_stride_s, cos_stride_s,
                   INVERSE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # int64: batch * stride can pass 2**31
    pos = pid % seq
    batch = pid // seq
    heads = tl.arange(0, BLOCK_H)[:, None].to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < n_heads) & (cols < half)
    x_tile = X + batch * x_stride_b + pos * x_stride_s + heads * x_stride_h
    x1 = tl.load(x_tile + cols * x_stride_d, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_tile + (cols + half) * x_stride_d, mask=mask, other=0.0).to(tl.float32)
    col_mask = cols < half
    c1 = tl.load(COS + pos * cos_stride_s + cols, mask=col_mask, other=0.0)
    c2 = tl.load(COS + pos * cos_stride_s + half + cols, mask=col_mask, other=0.0)
    s1 = tl.load(SIN + pos * cos_stride_s + cols, mask=col_mask, other=0.0)
    s2 = tl.load(SIN + pos * cos_stride_s + half + cols, mask=col_mask, other=0.0)
    if INVERSE:  # the transpose of the forward map, for the gradient
        out1 = x1 * c1 + x2 * s2
        out2 = x2 * c2 - x1 * s1
    else:
        out1 = x1 * c1 - x2 * s1
        out2 = x2 * c2 + x1 * s2
    out_tile = OUT + batch * out_stride_b + pos * out_stride_s + heads * out_stride_h
    tl.store(out_tile + cols, out1.to(OUT.dtype.element_ty), mask=mask)
    tl.store(out_tile + half + cols, out2.to(OUT.dtype.element_ty), mask=mask)


@torch.library.custom_op("plait::rotary", mutates_args=())
def rotary_op(x: Tensor, cos: Tensor, sin: Tensor, inverse: bool) -> Tensor:
    """The rotation of x [b, h, s, d] (or its transpose, inverse=True); fp32 cos/sin [s, d]."""
    batch, n_heads, seq, head_dim = x.shape
    out = torch.empty((batch, n_heads, seq, head_dim), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    cos, sin = cos.contiguous(), sin.contiguous()  # [seq, head_dim]: tiny, normally contiguous already
    block_h, block_half = triton.next_power_of_2(n_heads), triton.next_power_of_2(head_dim // 2)
    with on_device(x.device):
        _rotary_kernel[(batch * seq,)](
            x, cos, sin, out, n_heads, seq, head_dim // 2,
            x.stride(0), x.stride(1), x.stride(2), x.stride(3),
            out.stride(0), out.stride(1), out.stride(2), cos.stride(0),
            INVERSE=inverse, BLOCK_H=block_h, BLOCK_HALF=block_half,
            num_warps=num_warps_for(block_h * block_half))
    return out


@rotary_op.register_fake
def _(x: Tensor, cos: Tensor, sin: Tensor, inverse: bool) -> Tensor:
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output) -> None:
    _, cos, sin, inverse = inputs
    ctx.save_for_backward(cos, sin)
    ctx.inverse = inverse


def _backward(ctx, grad_out: Tensor):
    cos, sin = ctx.saved_tensors
    return rotary_op(grad_out, cos, sin, not ctx.inverse), None, None, None


rotary_op.register_autograd(_backward, setup_context=_setup_context)


def fused_apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """`apply_rotary` through the Triton kernel where it runs, else the reference itself."""
    supported = (
        x.device.type in _KERNEL_DEVICES and x.dim() == 4 and x.dtype in _DTYPES
        and x.shape[-1] % 2 == 0 and cos.shape == sin.shape == (x.shape[2], x.shape[3])
        and cos.dtype == sin.dtype == torch.float32 and cos.device == sin.device == x.device
        and not (cos.requires_grad or sin.requires_grad)  # the op gives the tables no gradient
        and triton.next_power_of_2(x.shape[1]) * triton.next_power_of_2(x.shape[3] // 2) <= MAX_TILE
    )
    if not supported:
        return apply_rotary(x, cos, sin)
    return rotary_op(x, cos, sin, False)
