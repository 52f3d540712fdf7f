"""A mixture-of-experts MLP in plain PyTorch, with no parallel code in it.

A router scores every token against every expert (softmax, or sigmoid as in DeepSeek-V3),
keeps the top k, and renormalises the k kept scores into combine weights. Routed
experts are SwiGLUs whose weights are stacked along a leading expert dimension
(`experts.w_gate` [n_experts, ffn_dim, dim], in nn.Linear's [out, in] convention), so a
parameter's name and full shape do not depend on how experts are spread over ranks:
expert parallelism initialises the full tensor and keeps its slice of dim 0. Shared
experts (DeepSeek-MoE) see every token; n of them are one SwiGLU of n x ffn_dim.

capacity_factor > 0 caps each expert at ceil(T·k/E · capacity_factor) token slots
(GShard); slots beyond the cap are dropped in token order, so the first tokens of the
batch win, deterministically. A dropped slot contributes zero (the token passes through
the residual, plus whatever its other experts and the shared experts give). 0 is dropless.

The experts' computation is the method `experts.forward(tokens, tokens_per_expert)` on
tokens grouped by expert, so expert parallelism swaps just it (as context parallelism
swaps attention's core).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from plait.model.mlp import SwiGLU


@dataclass
class RouterStats:
    """What the losses and metrics need from one forward of one MoE layer."""

    counts: torch.Tensor  # int64 [n_experts]: routed slots per expert before capacity dropping
    prob_sum: torch.Tensor  # [n_experts], differentiable: router probabilities summed over tokens
    logits: torch.Tensor  # fp32 [n_tokens, n_experts], differentiable (z-loss)
    n_tokens: int
    dropped_fraction: float  # dropped slots / (n_tokens * top_k)

    @property
    def probs_mean(self) -> torch.Tensor:
        """Mean router probability of each expert (p_i of the load-balancing loss)."""
        return self.prob_sum / max(self.n_tokens, 1)


def expert_capacity(n_tokens: int, top_k: int, n_experts: int, capacity_factor: float) -> int | None:
    """Slots per expert: ceil(T·k/E · capacity_factor); None when dropless (factor 0)."""
    if capacity_factor <= 0:
        return None
    return math.ceil(n_tokens * top_k / n_experts * capacity_factor)


class StackedExperts(nn.Module):
    """n SwiGLU experts with weights stacked along dim 0; expert i is a SwiGLU whose
    w_gate.weight is w_gate[i]. Holds experts first_expert .. first_expert + n - 1 (all of
    them unless expert parallelism sharded it)."""

    def __init__(self, n_experts: int, dim: int, ffn_dim: int):
        super().__init__()
        self.n_experts = n_experts  # the layer's total, whatever this module holds
        self.first_expert = 0
        self.w_gate = nn.Parameter(torch.empty(n_experts, ffn_dim, dim))
        self.w_up = nn.Parameter(torch.empty(n_experts, ffn_dim, dim))
        self.w_down = nn.Parameter(torch.empty(n_experts, dim, ffn_dim))

    @property
    def n_local(self) -> int:
        return self.w_gate.shape[0]

    def forward(self, tokens: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
        """tokens [sum(tokens_per_expert), dim], grouped by expert in order; same shape out."""
        return run_local_experts(self, tokens, tokens_per_expert)


def run_local_experts(experts: StackedExperts, tokens: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
    """Apply the module's own experts to their groups of tokens (one loop; clear, not fused)."""
    outputs = []
    for i, chunk in enumerate(torch.split(tokens, tokens_per_expert)):
        # An expert with no tokens still runs on 0 rows, so its gradient is zeros, not None.
        hidden = F.silu(F.linear(chunk, experts.w_gate[i])) * F.linear(chunk, experts.w_up[i])
        outputs.append(F.linear(hidden, experts.w_down[i]))
    return torch.cat(outputs) if outputs else tokens.new_zeros(tokens.shape)


class MoE(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, n_experts: int, top_k: int, n_shared_experts: int = 0,
                 score: Literal["softmax", "sigmoid"] = "softmax", capacity_factor: float = 0.0):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k {top_k} must be between 1 and n_experts {n_experts}")
        if score not in ("softmax", "sigmoid"):
            raise ValueError(f"unknown router score {score!r}")
        self.n_experts, self.top_k, self.score = n_experts, top_k, score
        self.capacity_factor = capacity_factor
        self.router = nn.Linear(dim, n_experts, bias=False)
        self.experts = StackedExperts(n_experts, dim, ffn_dim)
        self.shared = SwiGLU(dim, n_shared_experts * ffn_dim) if n_shared_experts > 0 else None
        # The latest forward's statistics, read by the trainer's auxiliary losses and metrics
        # (a Transformer block returns only its output).
        self.last_stats: RouterStats | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """For tokens x [T, dim]: logits [T, E] (fp32), probabilities [T, E] summing to 1 per
        token, chosen experts [T, k] and their combine weights [T, k] (summing to 1)."""
        logits = F.linear(x.float(), self.router.weight.float())
        if self.score == "softmax":
            scores = logits.softmax(dim=-1)
            probs = scores
        else:
            scores = logits.sigmoid()
            # Sigmoid scores do not sum to 1; the balance loss uses them normalised (DeepSeek-V3).
            probs = scores / scores.sum(dim=-1, keepdim=True)
        top_scores, chosen = scores.topk(self.top_k, dim=-1)
        weights = top_scores / top_scores.sum(dim=-1, keepdim=True)
        return logits, probs, chosen, weights

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        """x [..., dim] -> (output of the same shape, router statistics)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        n_tokens = x.shape[0]
        logits, probs, chosen, weights = self.route(x)

        slot_expert = chosen.flatten()  # [T*k], token-major: slot s is token s // k
        counts = torch.bincount(slot_expert, minlength=self.n_experts)
        # Group slots by expert; the stable sort keeps token order within each expert,
        # which is what decides who is dropped when an expert is over capacity.
        order = torch.argsort(slot_expert, stable=True)
        capacity = expert_capacity(n_tokens, self.top_k, self.n_experts, self.capacity_factor)
        if capacity is None:
            kept = order
            kept_counts = counts
        else:
            starts = torch.cumsum(counts, 0) - counts
            position = torch.arange(order.numel(), device=order.device)
            rank_in_expert = position - starts[slot_expert[order]]
            kept = order[rank_in_expert < capacity]
            kept_counts = counts.clamp(max=capacity)
        tokens = x[kept // self.top_k]
        expert_out = self.experts(tokens, kept_counts.tolist())
        combine = weights.flatten()[kept].to(expert_out.dtype)
        out = x.new_zeros(x.shape).index_add(0, kept // self.top_k, expert_out * combine[:, None])
        if self.shared is not None:
            out = out + self.shared(x)

        stats = RouterStats(
            counts=counts.detach(), prob_sum=probs.sum(dim=0), logits=logits, n_tokens=n_tokens,
            dropped_fraction=1.0 - kept.numel() / max(slot_expert.numel(), 1),
        )
        self.last_stats = stats
        return out.reshape(shape), stats
