"""Rank every layout of a job by predicted step time, keeping only those that fit."""

from __future__ import annotations

from plait.plan.cluster import Cluster
from plait.plan.estimate import Assumptions, Estimate, evaluate
from plait.plan.layouts import enumerate_layouts
from plait.plan.models import ModelSpec


def rank_layouts(model: ModelSpec, cluster: Cluster, n_gpus: int, global_batch: int, top: int = 10,
                 assumptions: Assumptions = Assumptions()) -> tuple[list[Estimate], int, int]:
    """The `top` fastest layouts that fit, how many layouts were considered, and how many fit."""
    fitting: list[Estimate] = []
    considered = 0
    for layout in enumerate_layouts(model, n_gpus, global_batch, cluster.gpus_per_node):
        considered += 1
        estimate = evaluate(model, cluster, layout, global_batch, assumptions, need_time_if_unfit=False)
        if estimate.fits:
            fitting.append(estimate)
    fitting.sort(key=lambda e: (e.step_time_s, e.memory_bytes["total"]))
    return fitting[:top], considered, len(fitting)
