"""Expert parallelism: the routed experts of an MoE layer split over an ep group.

Rank r of the group holds experts r·E/ep .. (r+1)·E/ep - 1 (a slice of dim 0 of the
stacked weights, so names and full shapes are those of the single-process layer). Router
and shared experts stay replicated. Every rank routes its own tokens, then (DeepSeek-MoE /
GShard dispatch):

  1. all-to-all of counts: each rank learns how many tokens every other rank sends to
     each of its local experts;
  2. all-to-all of the tokens (variable splits), grouped by destination rank;
  3. the local experts run on what arrived, regrouped by expert;
  4. all-to-all back along the reverse splits, and the MoE layer combines with the router
     weights as without expert parallelism.

The token all-to-all is an autograd function whose backward is the reverse all-to-all, so
gradients of the expert weights gather every rank's tokens and gradients of the tokens go
home. Capacity (if any) is applied by each rank to its own tokens before dispatch. Traffic
goes through the comm module under the tag "ep" (bytes sent = rows sent to other ranks).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from plait.comm import Comm, Group
from plait.model.moe import MoE, StackedExperts, run_local_experts

TAG = "ep"


def all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int],
               group: Group, comm: Comm, tag: str = TAG) -> torch.Tensor:
    """Send rows input_splits[j] of x (dim 0, in order) to group member j and receive
    output_splits[j] rows from member j; returns the received rows in member order."""
    if len(input_splits) != group.size or len(output_splits) != group.size:
        raise ValueError(f"splits {input_splits} / {output_splits} for a group of {group.size}")
    if sum(input_splits) != x.shape[0]:
        raise ValueError(f"input splits sum to {sum(input_splits)}, x has {x.shape[0]} rows")
    x = x.contiguous()
    if group.size == 1:
        return x.clone()
    out = x.new_empty((sum(output_splits), *x.shape[1:]))
    row_bytes = x[0:1].numel() * x.element_size() if x.dim() > 1 else x.element_size()
    sent = (sum(input_splits) - input_splits[group.rank]) * row_bytes
    launch = lambda: dist.all_to_all_single(  # noqa: E731
        out, x, output_split_sizes=list(output_splits), input_split_sizes=list(input_splits),
        group=group.process_group)
    comm._run(group, "all_to_all", tag, sent, launch, async_op=False)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group, comm):
        ctx.splits, ctx.group, ctx.comm = (output_splits, input_splits), group, comm
        return all_to_all(x, output_splits, input_splits, group, comm)

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        # Each received row's gradient goes back to the rank that sent the row.
        return all_to_all(grad, input_splits, output_splits, ctx.group, ctx.comm), None, None, None, None


def all_to_all_differentiable(x: torch.Tensor, output_splits: list[int], input_splits: list[int],
                              group: Group, comm: Comm) -> torch.Tensor:
    """`all_to_all` whose backward sends gradients back along the reverse splits."""
    return _AllToAll.apply(x, list(output_splits), list(input_splits), group, comm)


def exchange_counts(tokens_per_expert: list[int], group: Group, comm: Comm,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """From this rank's tokens per global expert [E] to the tokens every member sends to each
    local expert: int64 [ep, E/ep] on the CPU, row j from member j. The exchange itself runs
    on `device` (NCCL moves only device tensors)."""
    n_local = len(tokens_per_expert) // group.size
    send = torch.tensor(tokens_per_expert, dtype=torch.int64, device=device)
    received = all_to_all(send, [n_local] * group.size, [n_local] * group.size, group, comm)
    return received.view(group.size, n_local).cpu()


def dispatched_experts(experts: StackedExperts, tokens: torch.Tensor, tokens_per_expert: list[int],
                       group: Group, comm: Comm) -> torch.Tensor:
    """StackedExperts.forward under expert parallelism: tokens [N, dim] grouped by global
    expert (tokens_per_expert has all E entries) -> expert outputs in the same order."""
    n_local = experts.n_local
    per_rank = torch.tensor(tokens_per_expert, dtype=torch.int64).view(group.size, n_local)
    input_splits = per_rank.sum(dim=1).tolist()  # experts of a rank are contiguous: one chunk each
    received_counts = exchange_counts(tokens_per_expert, group, comm, tokens.device)  # [source, local expert]
    output_splits = received_counts.sum(dim=1).tolist()
    received = all_to_all_differentiable(tokens, output_splits, input_splits, group, comm)

    # Arrivals are ordered by source, then expert; the local experts want expert, then source.
    by_expert = regroup_by_expert(received_counts)
    by_expert = by_expert.to(received.device)
    local_out = run_local_experts(experts, received[by_expert], received_counts.sum(dim=0).tolist())
    back_in_source_order = local_out[torch.argsort(by_expert)]
    return all_to_all_differentiable(back_in_source_order, input_splits, output_splits, group, comm)


def regroup_by_expert(counts: torch.Tensor) -> torch.Tensor:
    """Indices that reorder rows grouped [source][expert] (counts [sources, experts]) into
    rows grouped [expert][source]."""
    starts = (torch.cumsum(counts.flatten(), 0) - counts.flatten()).view_as(counts)
    pieces = [torch.arange(int(starts[s, e]), int(starts[s, e] + counts[s, e]))
              for e in range(counts.shape[1]) for s in range(counts.shape[0])]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64)


def expert_slice(n_experts: int, rank: int, size: int) -> slice:
    """The experts member `rank` of an ep group of `size` holds."""
    if n_experts % size:
        raise ValueError(f"{n_experts} experts do not divide over an expert-parallel group of {size}")
    per_rank = n_experts // size
    return slice(rank * per_rank, (rank + 1) * per_rank)


@torch.no_grad()
def apply_expert_parallel(moe: MoE, group: Group, comm: Comm) -> None:
    """Keep this rank's slice of the (already initialised, full) expert weights and dispatch
    tokens over `group` (in place; parameter names unchanged). Router and shared-expert
    gradients must then be summed over the group like data-parallel ones; expert gradients
    are complete on their owner."""
    experts = moe.experts
    if experts.n_local != experts.n_experts:
        raise ValueError("the experts are already sharded")
    mine = expert_slice(experts.n_experts, group.rank, group.size)
    for name in ("w_gate", "w_up", "w_down"):
        full = getattr(experts, name)
        setattr(experts, name, torch.nn.Parameter(full[mine].clone(), requires_grad=full.requires_grad))
    experts.first_expert = mine.start
    if group.size > 1:
        experts.forward = functools.partial(dispatched_experts, experts, group=group, comm=comm)
