"""Fused RMSNorm: one Triton program per row forward, row blocks with partial weight sums backward.

`fused_rms_norm(x, weight, eps)` equals `plait.model.llama.rms_norm` (same signature, same
output dtype: x is normalised in fp32, rounded to x's dtype, then multiplied by weight in
their promoted dtype) but reads x once and writes the output once. Forward saves x, weight
and the per-row rstd (fp32, one number a row), never the normalised activations; backward
recomputes them. grad_weight is summed per program in fp32 over a block of rows, then the
[programs, dim] partials are summed by torch and cast to weight's dtype, as autograd would.

The op is `torch.ops.plait.rms_norm` (a torch.library custom op with a fake and an autograd
formula), so torch.compile keeps it as one opaque node without a graph break. Where the
kernels cannot run (CPU without the interpreter, no triton, odd shapes) the reference runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from plait.kernels.availability import kernel_device_types, num_warps_for, on_device, reduction_programs
from plait.model.llama import rms_norm

_KERNEL_DEVICES = kernel_device_types()
# One row lives in registers. Compiled for sm_90, the fp32 backward at 8192 columns uses 128
# registers a thread and no stack; at 16384 it spills. Wider rows keep the reference.
MAX_COLS = 8192
# The kernels compute in fp32: float64 inputs keep the reference rather than lose precision.
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _rms_norm_forward_kernel(X, W, Y, RSTD, x_row_stride, y_row_stride, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride can pass 2**31 on long inputs
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    # Round to x's dtype before the weight, as the reference's `.type_as(x) * weight` does.
    normed = (x * rstd).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * y_row_stride + cols, (normed * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_backward_kernel(GY, X, W, RSTD, GX, GW_PARTIAL, gy_row_stride, x_row_stride, gx_row_stride,
                              n_rows, n_cols, rows_per_program, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    grad_w = tl.zeros([BLOCK], dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row in range(row_start, row_end):
        gy = tl.load(GY + row * gy_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        normed = (x * rstd).to(X.dtype.element_ty).to(tl.float32)
        grad_w += gy * normed
        # The reference multiplies grad by weight in the output dtype, then upcasts.
        grad_normed = (gy * w).to(GY.dtype.element_ty).to(tl.float32)
        # d/dx of x * rstd(x): rstd * g - x * rstd^3 * mean(g * x).
        mean_gx = tl.sum(grad_normed * x, axis=0) / n_cols
        grad_x = rstd * grad_normed - x * (rstd * rstd * rstd * mean_gx)
        tl.store(GX + row * gx_row_stride + cols, grad_x.to(GX.dtype.element_ty), mask=mask)
    tl.store(GW_PARTIAL + pid * n_cols + cols, grad_w, mask=mask)


def _rows(t: Tensor) -> Tensor:
    """t as [rows, last dim] with unit stride along the row (a view when possible)."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


@torch.library.custom_op("plait::rms_norm", mutates_args=())
def rms_norm_op(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(output, rstd [x.shape[:-1]] fp32); `fused_rms_norm` is the public entry."""
    n_cols = x.shape[-1]
    x_rows = _rows(x)
    out = torch.empty(x.shape, dtype=torch.result_type(x, weight), device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if x_rows.shape[0] == 0:
        return out, rstd
    out_rows = out.view(-1, n_cols)
    block = triton.next_power_of_2(n_cols)
    with on_device(x.device):
        _rms_norm_forward_kernel[(x_rows.shape[0],)](
            x_rows, weight.contiguous(), out_rows, rstd, x_rows.stride(0), out_rows.stride(0), n_cols, eps,
            BLOCK=block, num_warps=num_warps_for(block))
    return out, rstd


@rms_norm_op.register_fake
def _(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    out = x.new_empty(x.shape, dtype=torch.result_type(x, weight))
    return out, x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("plait::rms_norm_backward", mutates_args=())
def rms_norm_backward_op(grad_out: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    """(grad_x in x's dtype, grad_weight in weight's dtype)."""
    n_cols = x.shape[-1]
    x_rows, gy_rows = _rows(x), _rows(grad_out)
    n_rows = x_rows.shape[0]
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if n_rows == 0:
        return grad_x, torch.zeros_like(weight)
    gx_rows = grad_x.view(-1, n_cols)
    programs = reduction_programs(x.device, n_rows)
    rows_per_program = triton.cdiv(n_rows, programs)
    programs = triton.cdiv(n_rows, rows_per_program)  # no program without rows
    partial = torch.empty((programs, n_cols), dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(n_cols)
    with on_device(x.device):
        _rms_norm_backward_kernel[(programs,)](
            gy_rows, x_rows, weight.contiguous(), rstd.contiguous(), gx_rows, partial,
            gy_rows.stride(0), x_rows.stride(0), gx_rows.stride(0), n_rows, n_cols, rows_per_program,
            BLOCK=block, num_warps=num_warps_for(block))
    return grad_x, partial.sum(0).to(weight.dtype)


@rms_norm_backward_op.register_fake
def _(grad_out: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape), torch.empty_like(weight)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _backward(ctx, grad_out: Tensor, grad_rstd: Tensor):
    x, weight, rstd = ctx.saved_tensors
    grad_x, grad_weight = rms_norm_backward_op(grad_out, x, weight, rstd)
    return grad_x, grad_weight, None


rms_norm_op.register_autograd(_backward, setup_context=_setup_context)


def fused_rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """`rms_norm` through the Triton kernels where they run, else the reference itself."""
    n_cols = x.shape[-1]
    if (x.device.type not in _KERNEL_DEVICES or weight.device != x.device or tuple(weight.shape) != (n_cols,)
            or n_cols > MAX_COLS or x.dtype not in _DTYPES or weight.dtype not in _DTYPES):
        return rms_norm(x, weight, eps)
    return rms_norm_op(x, weight, eps)[0]
