"""L-GreCo's rank choice: the dynamic programme against brute force (pure), and the adaptive
compressor's decision shared by 2 gloo processes."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from distributed import run_on_ranks
from plait.lowcomm.adaptive_rank import (
    AdaptivePowerSGD, candidate_ranks, choose_ranks, default_budget, measure_errors, total_error, total_size,
)


def brute_force(errors: dict, sizes: dict, budget: float) -> float:
    """The smallest total size of any choice within budget (inf when none is)."""
    names = sorted(errors)
    best = math.inf
    for choice in itertools.product(*(sorted(errors[n]) for n in names)):
        ranks = dict(zip(names, choice))
        if total_error(errors, ranks) <= budget:
            best = min(best, total_size(sizes, ranks))
    return best


def random_case(seed: int, grid: int | None = None) -> tuple[dict, dict]:
    """3-4 layers of 2-5 candidate ranks with random errors and sizes; errors on a grid of
    1/grid when `grid` is given."""
    rng = random.Random(seed)
    errors, sizes = {}, {}
    for layer in range(rng.randint(3, 4)):
        ranks = sorted(rng.sample(range(1, 17), rng.randint(2, 5)))
        errs = sorted((rng.randint(0, grid) / grid if grid else rng.random()) for _ in ranks)[::-1]
        if rng.random() < 0.3:  # not always monotone: the programme must not rely on it
            rng.shuffle(errs)
        name = f"layer{layer}"
        errors[name] = dict(zip(ranks, errs))
        sizes[name] = {r: r * rng.randint(5, 40) for r in ranks}
    return errors, sizes


def budgets(errors: dict, rng: random.Random) -> list[float]:
    low = sum(min(e.values()) for e in errors.values())
    high = sum(max(e.values()) for e in errors.values())
    return [low + (high - low) * rng.random() for _ in range(3)] + [low, high]


def smallest_error(errors: dict) -> float:
    return sum(min(e.values()) for e in errors.values())


def test_choice_matches_brute_force_when_errors_are_exact_units():
    """Errors that are whole units lose nothing to rounding: the programme then finds the
    brute-force optimum exactly."""
    for seed in range(40):
        errors, sizes = random_case(seed, grid=16)
        for budget in (0.0, 7 / 16, 1.0, 29 / 16, 40 / 16, 4.0):
            best = brute_force(errors, sizes, budget)
            if best == math.inf:
                with pytest.raises(ValueError):
                    choose_ranks(errors, sizes, budget)
                continue
            bins = max(1, round(64 * (budget - smallest_error(errors))))  # a unit of 1/64: exact
            chosen = choose_ranks(errors, sizes, budget, bins=bins)
            assert set(chosen) == set(errors)
            assert total_size(sizes, chosen) == best, (seed, budget)
            assert total_error(errors, chosen) <= budget


def test_choice_respects_budget_and_is_within_rounding_of_brute_force():
    """Random errors: always within budget, never smaller than the best choice within
    budget (it is one), never larger than the best with len(layers) units of slack."""
    rng = random.Random(0)
    bins = 200
    for seed in range(60):
        errors, sizes = random_case(100 + seed)
        for budget in budgets(errors, rng):
            unit = (budget - smallest_error(errors)) / bins
            chosen = choose_ranks(errors, sizes, budget, bins=bins)
            assert total_error(errors, chosen) <= budget
            best = brute_force(errors, sizes, budget)
            tighter = brute_force(errors, sizes, budget - len(errors) * unit)
            assert best <= total_size(sizes, chosen) <= tighter
        with pytest.raises(ValueError):
            choose_ranks(errors, sizes, smallest_error(errors) * 0.99)


def test_default_ranks_are_a_ceiling():
    """With the default's error as budget and the default as reference, the choice is
    never larger than the default, however coarse the units."""
    for seed in range(30):
        errors, sizes = random_case(300 + seed)
        default = {n: sorted(e)[len(e) // 2] for n, e in errors.items()}
        budget = default_budget(errors, default)
        for bins in (3, 50):
            chosen = choose_ranks(errors, sizes, budget, bins=bins, reference=default)
            assert total_size(sizes, chosen) <= total_size(sizes, default)
            assert total_error(errors, chosen) <= budget * (1 + 1e-12)
            assert total_size(sizes, chosen) >= brute_force(errors, sizes, budget * (1 + 1e-12))


def test_default_budget_and_candidates():
    errors = {"a": {2: 0.5, 4: 0.25}, "b": {2: 0.3, 4: 0.1}}
    assert default_budget(errors, 4) == pytest.approx(0.35)
    assert default_budget(errors, {"a": 2, "b": 4}) == pytest.approx(0.6)
    assert candidate_ranks(4) == [2, 3, 4, 6, 8]
    assert candidate_ranks(1) == [1, 2]


def test_measure_errors_is_the_truncated_svd():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(12, 2, generator=g) @ torch.randn(2, 9, generator=g) + 0.01 * torch.randn(12, 9, generator=g)
    errors = measure_errors(m, [1, 2, 3, 9, 20], relative=False)
    u, s, vh = torch.linalg.svd(m.double())
    for r in (1, 2, 3):
        truncated = (u[:, :r] * s[:r]) @ vh[:r]
        assert errors[r] == pytest.approx(float((m.double() - truncated).pow(2).sum()), rel=1e-9)
    assert errors[9] == errors[20] == 0.0
    relative = measure_errors(m, [1, 2])
    assert relative[2] < 1e-3 < relative[1] < 1
    assert measure_errors(torch.zeros(4, 3), [1]) == {1: 0.0}


# --- the decision on 2 processes ---------------------------------------------------------

def adaptive_grads(rank: int, step: int) -> dict:
    """`low` is nearly rank 2 (a column space shared by ranks and steps, plus a little noise,
    so its residual stays nearly rank 2 too), `noise` is full rank
    and smaller: a rank or two given to `noise` buys back far more error than `low` loses at
    rank 2, and costs less than `low` saves."""
    shared = torch.Generator().manual_seed(10)
    own = torch.Generator().manual_seed(100 + 10 * step + rank)
    low = torch.randn(64, 2, generator=shared) @ torch.randn(2, 48, generator=own)
    return {"low": low + 1e-3 * torch.randn(64, 48, generator=own),
            "noise": torch.randn(16, 12, generator=own), "bias": torch.randn(32, generator=own)}


def adaptive_checks(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from plait.parallel.comm import Comm, Group

    group = Group("dp", list(range(world)), rank, dist.group.WORLD)
    comm = Comm()
    adaptive = AdaptivePowerSGD(rank=4, warmup_steps=1, adjust_every=2)
    ranks_after, decisions, sent = [], [], []
    for step in range(1, 6):
        grads = adaptive_grads(rank, step)
        comm.take_bytes()
        adaptive.reduce(grads, group, comm, step)
        sent.append(comm.take_bytes())
        ranks_after.append(dict(adaptive.compressor.ranks))
        decisions.append(adaptive.decisions)
    return {"ranks": ranks_after, "decisions": decisions, "sent": sent, "grad": grads["noise"].clone()}


def test_every_rank_takes_the_same_decision():
    results = run_on_ranks(2, adaptive_checks)
    assert results[0]["ranks"] == results[1]["ranks"]
    assert torch.equal(results[0]["grad"], results[1]["grad"])
    # decided on the first compressed step (2) and every 2 steps after (4)
    assert results[0]["decisions"] == [0, 1, 1, 2, 2]
    # `low` drops to rank 2; `noise` takes the next candidate above the default to pay for it
    assert results[0]["ranks"][1] == results[0]["ranks"][-1] == {"low": 2, "noise": 6}
    assert results[0]["sent"][2] == 4 * ((64 + 48) * 2 + (16 + 12) * 6 + 32)
