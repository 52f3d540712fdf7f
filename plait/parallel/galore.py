"""GaLore (Zhao et al. 2024): optimizer state in a low-rank projection of each weight's gradient.

For a 2-D weight W (m x n) in a parameter group with a `rank` r, every `update_proj_gap`
steps the top-r singular vectors of the gradient on the smaller side are taken as P: the
left ones (m x r) when m <= n, and the gradient is projected as Pᵀ·G (r x n); else the right
ones (n x r) and the projection is G·P (m x r). The base optimizer (AdamW, or SGD with
momentum) keeps its state in that projected shape; its update is projected back (P·U or
U·Pᵀ), scaled by `scale`, and applied with the learning rate. Weight decay is decoupled
(W <- W·(1 - lr·wd)) in both bases. Groups without a rank (rank=None) get the base
optimizer unprojected; AdamW there follows torch.optim.AdamW's arithmetic.

The optimizer projects every 2-D parameter of a group with a rank, at
r = min(rank, smaller side): at full rank P is orthogonal and the projection is an exact
change of basis, which is what the equivalence test checks. `galore_param_groups` builds
the usual split: 2-D weights whose smaller side exceeds the rank are projected, the rest
not. As in the paper, the moments are kept as they are when P is refreshed; with
`transport_momentum=True` the first moment is carried into the new basis (m <- P_newᵀ·P_old·m,
an r x r product), which keeps full-rank SGD-momentum exact across refreshes.

Under data parallelism the gradient must be reduced before `step()` so that every rank
computes the same P.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

BASES = ("adamw", "sgd")


def galore_param_groups(model: nn.Module, rank: int) -> list[dict]:
    """Two parameter groups: the 2-D weights whose smaller side exceeds `rank` (projected)
    and everything else (rank=None: plain base optimizer)."""
    projected, plain = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (projected if p.dim() == 2 and min(p.shape) > rank else plain).append(p)
    groups = [{"params": projected, "rank": rank}] if projected else []
    return groups + ([{"params": plain, "rank": None}] if plain else [])


class GaLore(torch.optim.Optimizer):
    """GaLore around a base optimizer: base="adamw" (lr, betas, eps, weight_decay) or
    base="sgd" (lr, momentum, nesterov, weight_decay; torch.optim.SGD's momentum rule)."""

    def __init__(self, params: Iterable, base: str = "adamw", lr: float = 1e-3, rank: int | None = 128,
                 update_proj_gap: int = 200, scale: float = 0.25, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, momentum: float = 0.9, nesterov: bool = False,
                 transport_momentum: bool = False):
        if base not in BASES:
            raise ValueError(f"base must be one of {BASES}, got {base!r}")
        if update_proj_gap < 1:
            raise ValueError("update_proj_gap must be at least 1")
        self.base = base
        defaults = dict(lr=lr, rank=rank, update_proj_gap=update_proj_gap, scale=scale, betas=betas, eps=eps,
                        weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        transport_momentum=transport_momentum)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, p.grad, group)
        return loss

    def _update(self, p: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        state["step"] = state.get("step", 0) + 1
        projected = group["rank"] is not None and p.dim() == 2
        if projected:
            self._refresh_projection(state, grad, group)
            grad = self._project(state, grad)
        update = self._adamw(state, grad, group) if self.base == "adamw" else self._sgd(state, grad, group)
        scale = 1.0
        if projected:
            update = self._project_back(state, update)
            scale = group["scale"]
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(update.to(p.dtype), alpha=-group["lr"] * scale)

    # --- projection ---------------------------------------------------------------------
    def _refresh_projection(self, state: dict, grad: torch.Tensor, group: dict) -> None:
        if (state["step"] - 1) % group["update_proj_gap"]:
            return
        rows, cols = grad.shape
        r = min(group["rank"], rows, cols)
        u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
        state["left"] = rows <= cols  # project rows (Pᵀ·G) when they are the smaller side
        new = u[:, :r].contiguous() if state["left"] else vh[:r].t().contiguous()
        old = state.get("projection")
        if old is not None and group["transport_momentum"]:
            change = new.t() @ old  # r x r: old basis coordinates -> new basis coordinates
            key = "exp_avg" if self.base == "adamw" else "momentum_buffer"
            if key in state:
                moment = state[key]
                state[key] = change @ moment if state["left"] else moment @ change.t()
        state["projection"] = new

    @staticmethod
    def _project(state: dict, grad: torch.Tensor) -> torch.Tensor:
        P = state["projection"]
        return P.t() @ grad.float() if state["left"] else grad.float() @ P

    @staticmethod
    def _project_back(state: dict, update: torch.Tensor) -> torch.Tensor:
        P = state["projection"]
        return P @ update if state["left"] else update @ P.t()

    # --- base optimizers (on the possibly projected gradient) -----------------------------
    @staticmethod
    def _adamw(state: dict, grad: torch.Tensor, group: dict) -> torch.Tensor:
        beta1, beta2 = group["betas"]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = state["step"]
        bias1, bias2 = 1 - beta1 ** step, 1 - beta2 ** step
        denom = (exp_avg_sq.sqrt() / math.sqrt(bias2)).add_(group["eps"])
        return (exp_avg / bias1) / denom

    @staticmethod
    def _sgd(state: dict, grad: torch.Tensor, group: dict) -> torch.Tensor:
        beta = group["momentum"]
        if not beta:
            return grad
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = grad.clone()
        else:
            state["momentum_buffer"].mul_(beta).add_(grad)
        buffer = state["momentum_buffer"]
        return grad.add(buffer, alpha=beta) if group["nesterov"] else buffer.clone()


class GaLoreAdamW(GaLore):
    """GaLore with AdamW as the base optimizer (the paper's GaLore-AdamW)."""

    def __init__(self, params: Iterable, lr: float = 1e-3, rank: int | None = 128, update_proj_gap: int = 200,
                 scale: float = 0.25, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, base="adamw", lr=lr, rank=rank, update_proj_gap=update_proj_gap, scale=scale,
                         betas=betas, eps=eps, weight_decay=weight_decay)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in the optimizer's state tensors (moments and projections)."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values()
               for v in s.values() if isinstance(v, torch.Tensor))
