"""Fit the planner's efficiency and bandwidth parameters to plait's own runs.

A run directory holds `config.toml` (the full config) and `metrics.jsonl` (one object per
step: step_time_s, state_bytes, comm_bytes, ...). For each run we predict the step time with
the layout it used and compare with the median measured step time (the first steps, which
include compilation and warm-up, are skipped). Three parameters are fitted by minimising the
squared log error over all runs, one coordinate at a time on a log grid:
- `compute_scale`: achieved fraction of the datasheet FLOP/s and HBM bandwidth (scales the
  matmul ceiling and the HBM efficiency together),
- `gemm_half_dim`: the matrix size at which one dimension halves matmul efficiency,
- `network`: achieved fraction of link bandwidth, intra- and inter-node.
Fitted values are relative to the cluster given with --cluster.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

from plait.config import load_config  # the trainer's own loader, so a run reads as it ran
from plait.errors import ConfigError
from plait.plan.cluster import Cluster
from plait.plan.comm_model import NetworkEfficiency
from plait.plan.compute import Efficiency
from plait.plan.estimate import Assumptions, evaluate, predict_run_metrics
from plait.plan.layouts import Layout
from plait.plan.memory import PRECISIONS
from plait.plan.models import ModelSpec, from_plait_model

WARMUP_STEPS = 2


@dataclass
class Run:
    path: Path
    model: ModelSpec
    layout: Layout
    global_batch: int
    measured: dict[str, float]
    predicted_bytes: dict[str, float]
    dtype: str


def load_run(run_dir: str | Path) -> Run:
    path = Path(run_dir)
    if not (path / "config.toml").is_file() or not (path / "metrics.jsonl").is_file():
        raise ConfigError(f"run directory '{run_dir}' needs config.toml and metrics.jsonl")
    cfg = load_config(str(path / "config.toml"))
    rows = []
    for line in (path / "metrics.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line
        if isinstance(row, dict) and row.get("step_time_s"):
            rows.append(row)
    timed = rows[WARMUP_STEPS:] or rows
    if not timed:
        raise ConfigError(f"'{path / 'metrics.jsonl'}' has no step with step_time_s")
    p, t = cfg.parallel, cfg.train
    dp = p.dp or 1
    world = dp * p.tp * p.pp * p.cp
    micro_batch = t.micro_batch or -(-t.global_batch // dp)  # as config.validate derives it
    layout = Layout(tp=p.tp, pp=p.pp, dp=dp, cp=p.cp, ep=p.ep, zero=p.zero, micro_batch=micro_batch)
    measured = {"step_time_s": statistics.median(r["step_time_s"] for r in timed)}
    for key in ("state_bytes", "comm_bytes", "peak_mem_bytes"):
        values = [r[key] for r in timed if r.get(key) is not None]
        if values:
            measured[key] = max(values)
    return Run(path, from_plait_model(cfg.model, cfg.name), layout, t.global_batch, measured,
               predict_run_metrics(cfg, world), t.dtype)


def _assumptions(run: Run, params: dict[str, float]) -> Assumptions:
    base = Efficiency()
    eff = Efficiency(gemm_ceiling=min(1.0, base.gemm_ceiling * params["compute_scale"]),
                     gemm_half_dim=params["gemm_half_dim"],
                     hbm_efficiency=min(1.0, base.hbm_efficiency * params["compute_scale"]))
    net = replace(NetworkEfficiency(), intra_node=params["network"], inter_node=params["network"])
    return Assumptions(precision=PRECISIONS["fp32" if run.dtype == "fp32" else "bf16"], efficiency=eff, network=net)


def predicted_step_time(run: Run, cluster: Cluster, params: dict[str, float]) -> float:
    estimate = evaluate(run.model, cluster, run.layout, run.global_batch, _assumptions(run, params))
    if estimate.step_time_s is None:
        raise ConfigError(f"run '{run.path}': layout {run.layout.short()} is not valid: {estimate.why}")
    return estimate.step_time_s


def _loss(runs: list[Run], cluster: Cluster, params: dict[str, float]) -> float:
    return sum(math.log(predicted_step_time(r, cluster, params) / r.measured["step_time_s"]) ** 2 for r in runs)


SEARCH_RANGES = {"compute_scale": (1e-6, 1.25), "gemm_half_dim": (4.0, 4096.0), "network": (1e-4, 1.0)}


def fit(runs: list[Run], cluster: Cluster, rounds: int = 3, points: int = 25) -> dict[str, float]:
    """Coordinate descent on a log grid that narrows around the best value each round."""
    params = {"compute_scale": 1.0, "gemm_half_dim": Efficiency().gemm_half_dim,
              "network": NetworkEfficiency().inter_node}
    ranges = dict(SEARCH_RANGES)
    for _ in range(rounds):
        for name, (low, high) in ranges.items():
            grid = [low * (high / low) ** (i / (points - 1)) for i in range(points)]
            params[name] = min(grid, key=lambda v: _loss(runs, cluster, {**params, name: v}))
            ratio = (high / low) ** (2 / (points - 1))
            ranges[name] = (max(SEARCH_RANGES[name][0], params[name] / ratio),
                            min(SEARCH_RANGES[name][1], params[name] * ratio))
    return params


def calibrate(run_dirs: list[str], cluster: Cluster) -> dict:
    """Fitted parameters and, per run, predicted vs measured step time, state and comm bytes."""
    runs = [load_run(d) for d in run_dirs]
    params = fit(runs, cluster)
    report = []
    for run in runs:
        predicted = {"step_time_s": predicted_step_time(run, cluster, params),
                     "state_bytes": run.predicted_bytes["state_bytes"],
                     "comm_bytes": run.predicted_bytes["comm_bytes"]}
        errors = {k: predicted[k] / run.measured[k] - 1 for k in predicted if run.measured.get(k)}
        report.append({"run": str(run.path), "layout": run.layout.to_dict(), "measured": run.measured,
                       "predicted": predicted, "relative_error": errors})
    return {"cluster": cluster.name, "fitted": params, "runs": report}
