"""Per-layer PowerSGD ranks chosen by a dynamic programme (L-GreCo, 2022).

Every `adjust_every` steps, for each compressed matrix and each candidate rank (about 0.5x
to 2x the default), rank 0 measures the compression error and the size (n + m) * r. A
knapsack over discretised errors then picks one rank per layer minimising the total size
subject to the total error staying within the error of the default ranks, and rank 0
broadcasts the choice so that every rank compresses alike (ranks that disagreed would pack
P and Q differently and sum unrelated numbers).

The arithmetic (`measure_errors`, `default_budget`, `choose_ranks`) is pure and tested
without processes; `AdaptivePowerSGD` only adds the schedule and the broadcast.
"""

from __future__ import annotations

import math

import torch

from plait.comm import Comm, Group
from plait.lowcomm.powersgd import (
    PowerSGDCompressor,
    compressed_size,
    compresses,
    matrix_shape,
)

CANDIDATE_FACTORS = (0.5, 0.75, 1.0, 1.5, 2.0)


def candidate_ranks(default_rank: int, factors: tuple[float, ...] = CANDIDATE_FACTORS) -> list[int]:
    """Ranks around the default, e.g. 4 -> [2, 3, 4, 6, 8]; always includes the default."""
    return sorted({max(1, round(default_rank * f)) for f in factors} | {default_rank})


def measure_errors(grad: torch.Tensor, candidate_ranks: list[int], relative: bool = True) -> dict[int, float]:
    """Squared Frobenius error of the best rank-r approximation of `grad` (as a matrix), for
    each candidate r: the sum of the squared singular values beyond the r-th, divided by
    ||grad||^2 when `relative`.

    One set of singular values gives every candidate at once. The truncated SVD is the
    error PowerSGD converges to with a warm-started Q (one power iteration per step), so it
    is a lower bound of a single step's error, and it does not depend on the Q's history.
    Squared errors add up over layers: with `relative=False` the total is the squared error
    of the whole gradient. Relative errors weigh each layer alike, whatever its scale.
    """
    n, m = matrix_shape(grad.shape)
    s2 = torch.linalg.svdvals(grad.detach().reshape(n, m).double()).pow(2)
    total = float(s2.sum())
    tail = torch.flip(torch.cumsum(torch.flip(s2, [0]), 0), [0])  # tail[k] = sum of s2[k:]
    errors = {}
    for r in candidate_ranks:
        err = float(tail[r]) if r < len(s2) else 0.0
        errors[r] = (err / total if total > 0 else 0.0) if relative else err
    return errors


def default_budget(errors: dict[str, dict[int, float]], default_rank: int | dict[str, int]) -> float:
    """The total error of compressing every layer at its default rank."""
    if isinstance(default_rank, int):
        return sum(e[default_rank] for e in errors.values())
    return sum(errors[name][default_rank[name]] for name in errors)


def choose_ranks(
    errors: dict[str, dict[int, float]], sizes: dict[str, dict[int, int]], budget: float,
    bins: int = 1000, reference: dict[str, int] | None = None,
) -> dict[str, int]:
    """One rank per layer minimising sum(sizes) subject to sum(errors) <= budget.

    errors[name][r] and sizes[name][r] describe layer `name` at rank r (the same ranks in
    both). A knapsack over discretised errors: each layer's error is counted relative to a
    reference choice (`reference`, e.g. the default ranks, else each layer's most accurate
    rank), in units of (budget - smallest possible total error) / bins, rounded up. So

    - every accepted choice really is within `budget` (rounding up only overstates errors);
    - the reference itself costs exactly nothing, so it is always accepted and the result
      is never larger than it;
    - the result is never larger than the best choice within budget - len(errors) units.

    Ties in size go to the fewer error units. Raises ValueError when nothing fits, or when
    `reference` itself exceeds the budget.
    """
    names = sorted(errors)
    if not names:
        return {}
    most_accurate = {n: min(errors[n], key=lambda r: (errors[n][r], sizes[n][r])) for n in names}
    floor_error = total_error(errors, most_accurate)
    tolerance = 1e-12 * max(1.0, abs(budget))  # sums of the same numbers in another order
    if floor_error > budget + tolerance:
        raise ValueError(f"no choice of ranks keeps the compression error within {budget}")
    reference = dict(most_accurate if reference is None else reference)
    slack = budget - total_error(errors, reference)
    if slack < -tolerance:
        raise ValueError(f"the reference ranks exceed the error budget {budget}")
    unit = (budget - floor_error) / bins
    if unit <= 0:  # no room at all: only choices as accurate as the most accurate one
        return {n: min((r for r in errors[n] if errors[n][r] <= errors[n][most_accurate[n]]),
                       key=lambda r: (sizes[n][r], r)) for n in names}

    # costs[layer]: (units, size, rank) with units = ceil((error - reference error) / unit),
    # shifted per layer to start at 0; the capacity is shifted by the same total.
    costs, capacity = [], math.floor(max(slack, 0.0) / unit)
    for n in names:
        raw = [(math.ceil((errors[n][r] - errors[n][reference[n]]) / unit), sizes[n][r], r) for r in sorted(errors[n])]
        shift = min(units for units, _, _ in raw)  # <= 0: the reference costs 0
        costs.append([(units - shift, size, r) for units, size, r in raw])
        capacity -= shift

    inf = math.inf
    best = [0.0] + [inf] * capacity  # best[b]: smallest total size of the layers so far at b units
    picks: list[list[int | None]] = []  # picks[layer][b]: that layer's rank on the best path to b
    for options in costs:
        new, pick = [inf] * (capacity + 1), [None] * (capacity + 1)
        for b_prev, size_prev in enumerate(best):
            if size_prev == inf:
                continue
            for units, size, r in options:
                b = b_prev + units
                if b <= capacity and size_prev + size < new[b]:
                    new[b], pick[b] = size_prev + size, r
        best = new
        picks.append(pick)

    _, b = min((size, b) for b, size in enumerate(best) if size < inf)  # the reference always fits
    chosen: dict[str, int] = {}
    for layer in range(len(names) - 1, -1, -1):
        r = picks[layer][b]
        chosen[names[layer]] = r
        b -= next(units for units, _, rank in costs[layer] if rank == r)
    return chosen


def total_size(sizes: dict[str, dict[int, int]], ranks: dict[str, int]) -> int:
    return sum(sizes[name][r] for name, r in ranks.items())


def total_error(errors: dict[str, dict[int, float]], ranks: dict[str, int]) -> float:
    return sum(errors[name][r] for name, r in ranks.items())


class AdaptivePowerSGD:
    """PowerSGD whose per-layer ranks are re-chosen on rank 0 every `adjust_every` compressed
    steps (the first one included) and broadcast, so every rank takes the same decision.

    Layers are measured on rank 0's gradient plus its residual (what it is about to
    compress). Only layers that the default rank compresses take part; their candidate
    ranks are those of `candidate_ranks` that still compress.
    """

    def __init__(self, rank: int, warmup_steps: int = 0, adjust_every: int = 100,
                 min_compression: float = 1.0, bins: int = 1000,
                 factors: tuple[float, ...] = CANDIDATE_FACTORS, seed: int = 0):
        if adjust_every < 1:
            raise ValueError(f"adjust_every must be at least 1, got {adjust_every}")
        self.compressor = PowerSGDCompressor(rank, warmup_steps, min_compression, seed)
        self.adjust_every, self.bins, self.factors = adjust_every, bins, factors
        self.decisions = 0

    def due(self, step: int) -> bool:
        compressed_step = step - self.compressor.warmup_steps  # 1 on the first compressed step
        return compressed_step >= 1 and (compressed_step - 1) % self.adjust_every == 0

    def reduce(self, grads: dict[str, torch.Tensor], group: Group, comm: Comm, step: int) -> None:
        if group.size > 1 and grads and self.due(step):
            self.adjust(grads, group, comm)
        self.compressor.reduce(grads, group, comm, step)

    def adjust(self, grads: dict[str, torch.Tensor], group: Group, comm: Comm) -> dict[str, int]:
        """Decide on rank 0 and broadcast; returns (and installs) the per-layer ranks."""
        decision = self.decide(grads) if group.rank == 0 else None
        decision = comm.broadcast_object(decision, 0, group)
        self.compressor.ranks = dict(decision)
        self.decisions += 1
        return self.compressor.ranks

    def decide(self, grads: dict[str, torch.Tensor]) -> dict[str, int]:
        """Measure errors and sizes of this rank's gradients and run the programme."""
        c = self.compressor
        default = c.rank
        errors, sizes = {}, {}
        for name in sorted(grads):
            g = grads[name]
            if not compresses(g.shape, default, c.min_compression):
                continue
            ranks = [r for r in candidate_ranks(default, self.factors) if compresses(g.shape, r, c.min_compression)]
            matrix = g.detach().reshape(matrix_shape(g.shape)).float()
            if name in c.residual:
                matrix = matrix + c.residual[name]
            errors[name] = measure_errors(matrix, ranks)
            sizes[name] = {r: compressed_size(g.shape, r) for r in ranks}
        if not errors:
            return {}
        return choose_ranks(errors, sizes, default_budget(errors, default), self.bins,
                            reference={name: default for name in errors})
