"""MoE parallel folding (Megatron Core 2025): the MoE layers lay the same ranks out anew.

Attention and the other dense layers use the tp x cp x dp (x pp) grid of mesh.py. Inside one
pipeline stage the MoE layers regroup those tp·cp·dp ranks as etp x ep x edp: etp fastest,
then ep, then edp, over the stage's ranks in rank order. So ep is not an extra factor of the
world size; it is taken out of tp, cp and dp (cp 2 x dp 2 with ep 4 on 4 ranks; tp 2 x dp 2
with ep 2 puts the two tensor-parallel peers of a dp rank into one ep group). Every rank
routes the tokens it holds, which are distinct tokens on every rank of the stage (sequence
parallelism is required under tp), so each token is routed exactly once.

Gradients: routed-expert weights are replicated over edp (the ranks holding the same
experts), so they are reduced (and ZeRO-sharded) over edp only; router, shared experts and
the MoE block's norm stay with the dense parameters (reduced over dp x cp), and under
sequence parallelism their gradients are first summed over tp inside backward, as
tensor.py does for norms. `MoEEngine` holds one ZeroEngine for each kind.

Besides ep and edp, the MoE layers need two groups of token holders: `tokens`, every rank
of the stage (global-batch load-balancing counts and metrics), and `micro_batch`, the ranks
that hold the tokens of one data-parallel micro-batch (cp x tp; micro-batch scope).
"""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from plait.comm import CHECKPOINT, Comm, Group, new_group
from plait.config import OptimConfig
from plait.mesh import Mesh, ParallelDims
from plait.model.moe import MoE
from plait.parallel.expert import apply_expert_parallel, expert_slice
from plait.parallel.tensor_comm import TAG as TP_TAG
from plait.parallel.zero import ZeroEngine

EXPERT_MARK = ".experts."  # routed-expert parameters: blocks.N.mlp.experts.w_gate ...


def is_expert_param(name: str) -> bool:
    return EXPERT_MARK in name


def folded_groups(dims: ParallelDims, ep: int) -> dict[str, list[list[int]]]:
    """Global ranks of every ep and edp group (etp = 1), and of the token-holder groups.

    Pure arithmetic over mesh.ParallelDims: within each pipeline stage the tp·cp·dp ranks, in
    rank order, are numbered i = edp_i · ep + ep_i."""
    stages = dims.group_ranks("dp", "cp", "tp")  # one list per pipeline stage, in rank order
    out: dict[str, list[list[int]]] = {"ep": [], "edp": [], "tokens": stages,
                                       "micro_batch": dims.group_ranks("cp", "tp")}
    for ranks in stages:
        if len(ranks) % ep:
            raise ValueError(f"ep={ep} does not divide the {len(ranks)} tp x cp x dp ranks of a stage")
        out["ep"] += [ranks[start:start + ep] for start in range(0, len(ranks), ep)]
        out["edp"] += [ranks[offset::ep] for offset in range(ep)]
    return out


@dataclass
class ExpertGroups:
    ep: Group
    edp: Group
    tokens: Group
    micro_batch: Group


def build_expert_groups(mesh: Mesh, ep: int) -> ExpertGroups:
    """Create the folded groups (collective: every rank creates every group, in the same order)."""
    mine: dict[str, Group] = {}
    for name, groups in folded_groups(mesh.dims, ep).items():
        for ranks in groups:
            if len(ranks) == 1:
                process_group = None
            elif len(ranks) == mesh.world_size:
                process_group = dist.group.WORLD
            else:
                process_group = new_group(ranks, mesh.timeout_s)
            if mesh.rank in ranks:
                mine[name] = Group(f"moe_{name}", ranks, ranks.index(mesh.rank), process_group)
    return ExpertGroups(**mine)


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def _sum_over_tp(group: Group, comm: Comm):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        out = grad.contiguous().clone()  # never reduce in place into a tensor autograd may hold
        comm.all_reduce(out, group, tag=TP_TAG)
        return out
    return hook


def apply_moe_parallel(model: nn.Module, mesh: Mesh, comm: Comm, ep: int) -> ExpertGroups:
    """Expert parallelism over the folded ep groups, and whole gradients under sequence
    parallelism, for every MoE block of a built model (in place; names unchanged)."""
    groups = build_expert_groups(mesh, ep)
    for block in model.blocks:
        if not getattr(block, "is_moe", False):
            continue
        apply_expert_parallel(block.mlp, groups.ep, comm)
        if mesh.tp.size > 1:
            # Each tp rank routes its own part of the sequence, so the gradients of the
            # replicated router, shared experts and norm cover only those tokens: sum them
            # over tp in backward (before accumulation, so accumulation stays exact).
            replicated = [block.mlp_norm.weight, block.mlp.router.weight]
            if block.mlp.shared is not None:
                replicated += list(block.mlp.shared.parameters())
            for param in replicated:
                param.register_hook(_sum_over_tp(mesh.tp, comm))
    return groups


class _Subset:
    """The named parameters one ZeroEngine manages (the engine reads only named_parameters)."""

    def __init__(self, named: list[tuple[str, nn.Parameter]]):
        self._named = named

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return iter(self._named)


class MoEEngine:
    """Two ZeroEngines behind the one interface the trainer uses: dense parameters over dp x cp,
    routed-expert parameters over edp. The gradient norm is taken over both."""

    def __init__(self, model: nn.Module, comm: Comm, group: Group, optim: OptimConfig, *,
                 expert_groups: ExpertGroups, **engine_args):
        """Arguments as ZeroEngine's (`group`: the dense parameters' data-parallel group)."""
        named = list(model.named_parameters())
        self.comm, self.groups = comm, expert_groups
        self.dense = ZeroEngine(_Subset([(n, p) for n, p in named if not is_expert_param(n)]), comm, group,
                                optim, **engine_args)
        # Expert weights are whole on each rank (etp = 1) and disjoint across ep: no tp or pp
        # terms in their norm, only the sum over ep taken in clip_grad_norm.
        engine_args.update(tp_group=None, pp_group=None, norm_exclude=frozenset(), units=None)
        self.experts = ZeroEngine(_Subset([(n, p) for n, p in named if is_expert_param(n)]), comm,
                                  expert_groups.edp, optim, **engine_args)
        self.engines = (self.dense, self.experts)
        self.compute_dtype, self.device = self.dense.compute_dtype, self.dense.device

    @contextmanager
    def micro_batch(self, final: bool) -> Iterator[None]:
        with ExitStack() as stack:
            for engine in self.engines:
                stack.enter_context(engine.micro_batch(final))
            yield

    @contextmanager
    def deferred(self) -> Iterator[None]:
        with ExitStack() as stack:
            for engine in self.engines:
                stack.enter_context(engine.deferred())
            yield

    def sync_gradients(self) -> None:
        for engine in self.engines:
            engine.sync_gradients()

    def clip_grad_norm(self, max_norm: float) -> float:
        dense = self.dense.clip_grad_norm(0.0)  # 0: measure only
        experts = torch.tensor([self.experts.clip_grad_norm(0.0) ** 2], dtype=torch.float64, device=self.device)
        self.comm.all_reduce(experts, self.groups.ep, tag="grad_norm")  # disjoint experts
        norm = float((dense ** 2 + float(experts[0])) ** 0.5)
        if max_norm > 0 and math.isfinite(norm):
            coef = max_norm / (norm + 1e-6)
            if coef < 1.0:
                for engine in self.engines:
                    for b in range(len(engine.buckets)):
                        engine.reducer.grad_shard(b).mul_(coef)
        return norm

    def step(self, lr: float) -> None:
        for engine in self.engines:
            engine.step(lr)

    def zero_grad(self) -> None:
        for engine in self.engines:
            engine.zero_grad()

    def state_bytes(self) -> int:
        return sum(engine.state_bytes() for engine in self.engines)

    # --- checkpoints: expert tensors gathered whole over ep --------------------------------
    def full_state(self, optimizer: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
        params, optim = self.dense.full_state(optimizer)
        expert_params, expert_optim = self.experts.full_state(optimizer)
        for name, local in expert_params.items():
            params[name] = self._gather_experts(local)
            if name in expert_optim:
                optim[name] = {k: (v if k == "step" else self._gather_experts(v)) for k, v in expert_optim[name].items()}
        return params, optim

    def _gather_experts(self, local: torch.Tensor) -> torch.Tensor:
        ep = self.groups.ep
        if ep.size == 1:
            return local
        full = torch.empty((local.shape[0] * ep.size, *local.shape[1:]), dtype=local.dtype, device=self.device)
        self.comm.all_gather_into(full, local.to(self.device).contiguous(), ep, tag=CHECKPOINT)
        return full.cpu()

    def load_full_state(self, params: dict[str, torch.Tensor], optim: dict[str, dict[str, torch.Tensor]]) -> None:
        mine = lambda t: t[expert_slice(t.shape[0], self.groups.ep.rank, self.groups.ep.size)]  # noqa: E731
        dense_p = {n: t for n, t in params.items() if not is_expert_param(n)}
        dense_o = {n: s for n, s in optim.items() if not is_expert_param(n)}
        expert_p = {n: mine(t) for n, t in params.items() if is_expert_param(n)}
        expert_o = {n: {k: (v if k == "step" else mine(v)) for k, v in s.items()}
                    for n, s in optim.items() if is_expert_param(n)}
        self.dense.load_full_state(dense_p, dense_o)
        self.experts.load_full_state(expert_p, expert_o)
