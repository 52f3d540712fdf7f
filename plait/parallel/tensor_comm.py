"""The communication of tensor and sequence parallelism: Megatron's conjugate pairs.

Each pair is one autograd function whose backward is the other's forward:

  copy_to_tp       forward identity,                 backward all-reduce      ("f")
  reduce_from_tp   forward all-reduce,               backward identity        ("g")
  gather_from_sp   forward all-gather of the sequence, backward reduce-scatter
  reduce_scatter_to_sp  forward reduce-scatter of the sequence, backward all-gather

A tensor-parallel region starts where activations enter column-parallel layers (f, or the
all-gather under sequence parallelism) and ends after row-parallel layers (g, or the
reduce-scatter). The sequence is dim 1 of [batch, seq, ...]. Everything goes through the
comm module, so the traffic shows up in comm_bytes under the tag "tp".
"""

from __future__ import annotations

import torch

from plait.comm import Comm, Group

TAG = "tp"
SEQ_DIM = 1


def gather_along(x: torch.Tensor, dim: int, group: Group, comm: Comm, tag: str = TAG) -> torch.Tensor:
    """Concatenate every rank's (equally shaped) x along `dim`, in rank order."""
    moved = x.movedim(dim, 0).contiguous()  # the comm module gathers along dim 0
    out = moved.new_empty((moved.shape[0] * group.size, *moved.shape[1:]))
    comm.all_gather_into(out, moved, group, tag=tag)
    return out.movedim(0, dim)


def reduce_scatter_along(x: torch.Tensor, dim: int, group: Group, comm: Comm, tag: str = TAG) -> torch.Tensor:
    """Sum x over the group and keep this rank's 1/size slice along `dim`."""
    moved = x.movedim(dim, 0).contiguous()
    if moved.shape[0] % group.size:
        raise ValueError(f"length {moved.shape[0]} of dim {dim} is not divisible by the tp degree {group.size}")
    out = moved.new_empty((moved.shape[0] // group.size, *moved.shape[1:]))
    comm.reduce_scatter(out, moved, group, tag=tag)
    return out.movedim(0, dim)


def _all_reduced(x: torch.Tensor, group: Group, comm: Comm) -> torch.Tensor:
    out = x.contiguous().clone()  # never reduce in place into a tensor autograd may still hold
    comm.all_reduce(out, group, tag=TAG)
    return out


class _CopyToTensorParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group, comm: Comm) -> torch.Tensor:
        ctx.group, ctx.comm = group, comm
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Each rank's column shard saw the whole input, so the input's gradient is the sum.
        return _all_reduced(grad, ctx.group, ctx.comm), None, None


class _ReduceFromTensorParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group, comm: Comm) -> torch.Tensor:
        return _all_reduced(x, group, comm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None


class _GatherFromSequenceParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group, comm: Comm) -> torch.Tensor:
        ctx.group, ctx.comm = group, comm
        # Contiguous once here, rather than copied by each of the layers that read it.
        return gather_along(x, SEQ_DIM, group, comm).contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Every rank's gradient covers the whole sequence; each keeps the sum over its slice.
        return reduce_scatter_along(grad, SEQ_DIM, ctx.group, ctx.comm), None, None


class _ReduceScatterToSequenceParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group, comm: Comm) -> torch.Tensor:
        ctx.group, ctx.comm = group, comm
        return reduce_scatter_along(x, SEQ_DIM, group, comm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return gather_along(grad, SEQ_DIM, ctx.group, ctx.comm), None, None


def copy_to_tp(x: torch.Tensor, group: Group, comm: Comm) -> torch.Tensor:
    return _CopyToTensorParallel.apply(x, group, comm) if group.size > 1 else x


def reduce_from_tp(x: torch.Tensor, group: Group, comm: Comm) -> torch.Tensor:
    return _ReduceFromTensorParallel.apply(x, group, comm) if group.size > 1 else x


class SequenceRegather:
    """The whole-sequence input of column-parallel layers, rebuilt in backward from the local
    slice: layers that read a gathered activation save only the slice (Korthikanti et al.:
    activations 1/tp under sequence parallelism), and the first of them to run backward
    gathers it again for every other (q/k/v, gate/up), dropping it after the last one."""

    def __init__(self, group: Group, comm: Comm):
        # No reference to the slice itself: each reader saves it for backward, so that
        # recomputation can drop it like any other saved activation.
        self.group, self.comm = group, comm
        self.users = 0
        self._full: torch.Tensor | None = None

    def full(self, local: torch.Tensor) -> torch.Tensor:
        if self._full is None:
            self._full = gather_along(local, SEQ_DIM, self.group, self.comm).contiguous()
        return self._full

    def release(self) -> None:
        self.users -= 1
        if self.users <= 0:
            self._full = None


def gather_from_sp(x: torch.Tensor, group: Group, comm: Comm) -> torch.Tensor:
    if group.size == 1:
        return x
    out = _GatherFromSequenceParallel.apply(x, group, comm)
    out.sp_local, out.sp_regather = x, SequenceRegather(group, comm)  # read by ColumnParallelLinear
    return out


def reduce_scatter_to_sp(x: torch.Tensor, group: Group, comm: Comm) -> torch.Tensor:
    return _ReduceScatterToSequenceParallel.apply(x, group, comm) if group.size > 1 else x


def enter_tp_region(x: torch.Tensor, group: Group, comm: Comm, sequence_parallel: bool) -> torch.Tensor:
    """Replicated (or sequence-sharded) activations -> input of column-parallel layers."""
    return gather_from_sp(x, group, comm) if sequence_parallel else copy_to_tp(x, group, comm)


def leave_tp_region(x: torch.Tensor, group: Group, comm: Comm, sequence_parallel: bool) -> torch.Tensor:
    """Partial sums from row-parallel layers -> replicated (or sequence-sharded) activations."""
    return reduce_scatter_to_sp(x, group, comm) if sequence_parallel else reduce_from_tp(x, group, comm)
