"""Rank every layout of a job by predicted step time, keeping only those that fit; or, with
some fields pinned, find the best layout that keeps them and say why the runner-up lost."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from plait.plan.cluster import GB, Cluster
from plait.plan.estimate import Assumptions, Estimate, evaluate
from plait.plan.layouts import enumerate_layouts
from plait.plan.models import ModelSpec


def rank_layouts(model: ModelSpec, cluster: Cluster, n_gpus: int, global_batch: int, top: int = 10,
                 assumptions: Assumptions = Assumptions(),
                 pinned: Mapping[str, object] | None = None) -> tuple[list[Estimate], int, int]:
    """The `top` fastest layouts that fit (keeping the pinned fields), how many layouts were
    considered, and how many fit."""
    fitting, _, considered = _evaluate_all(model, cluster, n_gpus, global_batch, assumptions, pinned)
    return fitting[:top], considered, len(fitting)


def _evaluate_all(model: ModelSpec, cluster: Cluster, n_gpus: int, global_batch: int, assumptions: Assumptions,
                  pinned: Mapping[str, object] | None) -> tuple[list[Estimate], Estimate | None, int]:
    """Every layout keeping the pinned fields: those that fit, fastest first; the one needing
    the least memory among those that do not; how many were considered."""
    fitting: list[Estimate] = []
    closest: Estimate | None = None
    considered = 0
    for layout in enumerate_layouts(model, n_gpus, global_batch, cluster.gpus_per_node, pinned):
        considered += 1
        estimate = evaluate(model, cluster, layout, global_batch, assumptions, need_time_if_unfit=False, validated=True)
        if estimate.fits:
            fitting.append(estimate)
        elif closest is None or estimate.memory_bytes["total"] < closest.memory_bytes["total"]:
            closest = estimate
    fitting.sort(key=_rank_key)
    return fitting, closest, considered


def _rank_key(e: Estimate) -> tuple[float, float]:
    # Faster first; at equal speed, less memory (more headroom for the allocator).
    return (round(e.step_time_s or 0.0, 9), e.memory_bytes["total"])


@dataclass
class PinnedResult:
    """The outcome of a pinned search."""
    best: Estimate | None  # the fastest layout that fits, None when none does
    runner_up: Estimate | None
    runner_up_lost: str | None  # why the runner-up is not the best, in words
    considered: int
    fitting: int
    closest: Estimate | None = None  # when nothing fits: the valid layout needing the least memory
    searched: list[str] = field(default_factory=list)


SEARCHED_FIELDS = ("tp", "pp", "dp", "cp", "ep", "zero", "micro_batch", "schedule", "virtual_stages",
                   "recompute", "sequence_parallel")


def pinned_search(model: ModelSpec, cluster: Cluster, n_gpus: int, global_batch: int,
                  pinned: Mapping[str, object], assumptions: Assumptions = Assumptions()) -> PinnedResult:
    """Search every field not in `pinned`; the pinned ones are never changed."""
    fitting, closest, considered = _evaluate_all(model, cluster, n_gpus, global_batch, assumptions, pinned)
    searched = [k for k in SEARCHED_FIELDS if k not in pinned]
    if not fitting:
        if closest is not None:  # fill in its times so it can be explained
            closest = evaluate(model, cluster, closest.layout, global_batch, assumptions)
        return PinnedResult(None, None, None, considered, 0, closest, searched)
    best = fitting[0]
    # The runner-up is the fastest layout that is slower: layouts that tie with the best (a
    # ZeRO stage that costs no time here, say) are alternatives, not rivals.
    slower = [e for e in fitting[1:] if (e.step_time_s or 0.0) > (best.step_time_s or 0.0) * (1 + 1e-9)]
    runner = slower[0] if slower else (fitting[1] if len(fitting) > 1 else None)
    return PinnedResult(best, runner, why_slower(best, runner) if runner else None, considered, len(fitting),
                        searched=searched)


def why_slower(best: Estimate, other: Estimate) -> str:
    """One line: which fields differ and which time terms made `other` slower (or, at the same
    speed, that it needs more memory)."""
    a, b = best.layout.to_dict(), other.layout.to_dict()
    changed = ",".join(f"{k}={b[k]}" for k in b if a.get(k) != b[k]) or "same fields"
    dt = (other.step_time_s or 0.0) - (best.step_time_s or 0.0)
    if dt <= 1e-9 * (best.step_time_s or 1.0):
        dm = other.memory_bytes["total"] - best.memory_bytes["total"]
        return f"{changed}: same step time, {dm / GB:+.2f} GB per device"
    deltas = sorted(((other.time_s[k] - best.time_s.get(k, 0.0), k) for k in other.time_s), reverse=True)
    worse = ", ".join(f"{k} {d:+.3f} s" for d, k in deltas[:2] if d > 0)
    return f"{changed}: {dt / best.step_time_s:+.1%} step time ({worse})"
