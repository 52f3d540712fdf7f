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

A JSON file of measured (shape, tokens/s) points instead fits the device's compute
efficiencies (matmul ceiling and half-efficiency dimension, fused-attention efficiency);
see `calibrate_points`.
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
from plait.plan.compute import Efficiency, efficiency_for
from plait.plan.estimate import Assumptions, evaluate, predict_run_metrics
from plait.plan.layouts import Layout, parse_layout
from plait.plan.memory import PRECISIONS
from plait.plan.models import ModelSpec, from_plait_model, resolve_model

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


# --- measured (shape, tokens/s) points: fit the device's compute efficiency ------------------
#
# A JSON file {"points": [{"model": "llama-1b", "micro_batch": 8, "tokens_per_s": 57400}, ...]}:
# each point is one measured training step configuration: a model (plan preset, plait preset
# or TOML), optional "set" overrides (["model.seq_len=4096"]), the micro-batch, and the
# measured tokens/s per GPU; optionally "gpus" and an exact "layout" ("tp=2,micro_batch=4") for
# multi-GPU points, and "global_batch" (default: one micro-batch per data-parallel rank).
# The matmul ceiling, its half-efficiency dimension and the fused-attention efficiency are
# fitted (squared log error of tokens/s), starting from the cluster's device figures; the
# result goes into the cluster file's [efficiency] table.

POINT_FIELDS = {"model", "set", "micro_batch", "tokens_per_s", "gpus", "layout", "global_batch"}
EFFICIENCY_RANGES = {"gemm_ceiling": (0.05, 1.0), "gemm_half_dim": (4.0, 2048.0), "attention_efficiency": (0.02, 1.0)}


@dataclass
class Point:
    model: ModelSpec
    layout: Layout
    global_batch: int
    tokens_per_s: float
    label: str


def load_points(path: str | Path) -> list[Point]:
    """Read and check a points file; a bad entry is a ConfigError naming it."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--calibrate {path}: not a readable JSON file ({exc})") from None
    entries = raw.get("points") if isinstance(raw, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"--calibrate {path}: needs a non-empty 'points' list")
    points = []
    for i, entry in enumerate(entries):
        where = f"--calibrate {path}: points[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be an object")
        unknown = set(entry) - POINT_FIELDS
        if unknown:
            raise ConfigError(f"{where}.{sorted(unknown)[0]} is not a known field ({', '.join(sorted(POINT_FIELDS))})")
        for key in ("model", "micro_batch", "tokens_per_s"):
            if key not in entry:
                raise ConfigError(f"{where}.{key} is missing")
        tokens_per_s, micro_batch = entry["tokens_per_s"], entry["micro_batch"]
        if isinstance(tokens_per_s, bool) or not isinstance(tokens_per_s, (int, float)) or tokens_per_s <= 0:
            raise ConfigError(f"{where}.tokens_per_s={tokens_per_s!r} must be a positive number")
        if isinstance(micro_batch, bool) or not isinstance(micro_batch, int) or micro_batch < 1:
            raise ConfigError(f"{where}.micro_batch={micro_batch!r} must be a positive integer")
        gpus = int(entry.get("gpus", 1))
        model, _, _ = resolve_model(str(entry["model"]), list(entry.get("set", [])))
        layout = parse_layout(f"micro_batch={micro_batch}," + str(entry.get("layout", "")).strip(","), gpus)
        if layout.world_size != gpus:
            raise ConfigError(f"{where}.layout has {layout.world_size} devices but gpus is {gpus}")
        batch = int(entry.get("global_batch", micro_batch * layout.dp))
        points.append(Point(model, layout, batch, float(tokens_per_s), f"{entry['model']} mb{micro_batch}"))
    return points


def _predicted_tokens_per_s(point: Point, cluster: Cluster, eff: Efficiency) -> float:
    estimate = evaluate(point.model, cluster, point.layout, point.global_batch, Assumptions(efficiency=eff))
    if estimate.tokens_per_s_per_gpu is None:
        raise ConfigError(f"calibration point {point.label}: layout {point.layout.short()} is not valid: {estimate.why}")
    return estimate.tokens_per_s_per_gpu


def fit_points(points: list[Point], cluster: Cluster, rounds: int = 3, grid: int = 21) -> Efficiency:
    """Coordinate descent on a log grid narrowing around the best value each round."""
    eff = efficiency_for(cluster)
    ranges = dict(EFFICIENCY_RANGES)

    def loss(candidate: Efficiency) -> float:
        return sum(math.log(_predicted_tokens_per_s(p, cluster, candidate) / p.tokens_per_s) ** 2 for p in points)

    for _ in range(rounds):
        for name, (low, high) in ranges.items():
            values = [low * (high / low) ** (i / (grid - 1)) for i in range(grid)]
            best = min(values, key=lambda value: loss(replace(eff, **{name: value})))
            eff = replace(eff, **{name: best})
            ratio = (high / low) ** (2 / (grid - 1))
            ranges[name] = (max(EFFICIENCY_RANGES[name][0], best / ratio), min(EFFICIENCY_RANGES[name][1], best * ratio))
    return eff


def calibrate_points(path: str, cluster: Cluster) -> dict:
    """Fitted efficiencies and, per point, tokens/s predicted before and after the fit."""
    points = load_points(path)
    before = efficiency_for(cluster)
    after = fit_points(points, cluster)
    rows = []
    for p in points:
        old, new = _predicted_tokens_per_s(p, cluster, before), _predicted_tokens_per_s(p, cluster, after)
        rows.append({"point": p.label, "layout": p.layout.short(), "measured_tokens_per_s": p.tokens_per_s,
                     "predicted_before": old, "predicted_after": new,
                     "error_before": old / p.tokens_per_s - 1, "error_after": new / p.tokens_per_s - 1})
    fitted = {k: getattr(after, k) for k in EFFICIENCY_RANGES}
    toml = "[efficiency]\n" + "".join(f"{k} = {v:.4g}\n" for k, v in fitted.items())
    return {"cluster": cluster.name, "fitted": fitted, "points": rows, "cluster_toml": toml}
