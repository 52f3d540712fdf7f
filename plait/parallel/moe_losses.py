"""Auxiliary losses of mixture-of-experts routers, at micro-batch or global-batch scope.

Load-balancing loss (Switch / GShard): LBL = N_E · Σ_i f_i · p_i, with f_i the fraction of
the k·T routed slots that chose expert i (counted, so no gradient) and p_i the mean router
probability of expert i (differentiable). Uniform routing gives 1, total collapse N_E.

Scope. At micro-batch scope f and p come from the tokens of one forward pass. At
global-batch scope ("Demons in the Detail", Qwen 2025) f comes from the counts of the whole
optimizer step: all-reduced over the data-parallel group and accumulated over the
gradient-accumulation micro-batches, so a micro-batch drawn from one domain is not pushed
to spread its tokens over every expert. Since f is only known once the step's last
micro-batch is routed, the loss is computed then: `GlobalBatchCounts` accumulates counts as
micro-batches go, the caller keeps each micro-batch's differentiable `prob_sum`, and
`GlobalBatchCounts.loss` turns them into this rank's share of the global loss. The shares
of all ranks sum to N_E · Σ f_i · p_i over the global batch, and so do their gradients
under plait's data parallelism (gradients summed over ranks, not averaged). The price is
that the router graphs of the step's micro-batches live until that loss's backward.

Router z-loss (ST-MoE): mean over tokens of logsumexp(logits)², keeping router logits small.
"""

from __future__ import annotations

import torch

from plait.comm import Comm, Group

TAG = "moe"


def expert_fraction(counts: torch.Tensor) -> torch.Tensor:
    """f_i: each expert's share of the routed slots (fp32, no gradient)."""
    counts = counts.detach().float()
    return counts / counts.sum().clamp(min=1.0)


def load_balancing_loss(counts: torch.Tensor, probs_mean: torch.Tensor) -> torch.Tensor:
    """Micro-batch scope: N_E · Σ f_i p_i from per-expert slot counts [E] and mean router
    probabilities [E] of the same tokens."""
    n_experts = counts.numel()
    return n_experts * (expert_fraction(counts).to(probs_mean.device) * probs_mean.float()).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of logsumexp(logits)² for router logits [..., E]."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


class GlobalBatchCounts:
    """Per-expert routed-slot counts of one optimizer step, summed over `group` and over the
    step's micro-batches.

    Per micro-batch: `add(stats.counts)` (a collective: every rank of the group calls it, in
    the same order) and keep `stats.prob_sum`. At the end of the step:
    `loss(sum of the kept prob_sums)`, then `reset()` before the next step.
    """

    def __init__(self, n_experts: int, top_k: int, group: Group, comm: Comm, tag: str = TAG):
        self.n_experts, self.top_k = n_experts, top_k
        self.group, self.comm, self.tag = group, comm, tag
        self.counts = torch.zeros(n_experts, dtype=torch.int64)
        self.micro_batches = 0

    def add(self, counts: torch.Tensor) -> torch.Tensor:
        """Add one micro-batch's local counts [E]; returns that micro-batch's group-wide counts."""
        if counts.shape != (self.n_experts,):
            raise ValueError(f"counts of shape {tuple(counts.shape)}, expected ({self.n_experts},)")
        # Reduced where the counts live (NCCL moves only device tensors), accumulated on the CPU.
        summed = counts.detach().to(torch.int64).clone()
        self.comm.all_reduce(summed, self.group, tag=self.tag)
        summed = summed.cpu()
        self.counts += summed
        self.micro_batches += 1
        return summed

    @property
    def n_tokens(self) -> int:
        """Tokens routed so far in the step, over the whole group (every token fills k slots)."""
        return int(self.counts.sum()) // self.top_k

    def fraction(self) -> torch.Tensor:
        """f_i over everything added so far."""
        return expert_fraction(self.counts)

    def loss(self, prob_sum: torch.Tensor) -> torch.Tensor:
        """This rank's share of the global-batch LBL, from its router probabilities summed over
        all its tokens of the step [E] (differentiable): N_E · Σ f_i · prob_sum_i / T_global.
        Summed over the group (values, and gradients as data parallelism sums them) it is
        N_E · Σ f_i p_i with p_i the mean probability over the global batch."""
        if self.micro_batches == 0:
            raise RuntimeError("no micro-batch counts were added this step")
        f = self.fraction().to(prob_sum.device)
        return self.n_experts * (f * prob_sum.float()).sum() / max(self.n_tokens, 1)

    def reset(self) -> None:
        self.counts.zero_()
        self.micro_batches = 0
