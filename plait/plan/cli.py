"""`plait plan`: rank layouts for a model on a cluster, evaluate or explain one, or calibrate.

    plait plan --model llama3-70b --gpus 1024 --cluster h100-sxm --top 10
    plait plan --model megatron-1t --gpus 3072 --global-batch 3072 --layout "tp=8,pp=64,..." --json
    plait plan --model tiny --gpus 2 --explain "dp=2,micro_batch=8"
    plait plan --calibrate runs/a runs/b --cluster h100-sxm
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from rich.console import Console
from rich.table import Table

from plait.config import apply_override, config_from_dict, load_config
from plait.errors import ConfigError
from plait.plan import models
from plait.plan.calibrate import calibrate
from plait.plan.cluster import GB, check_capacity, load_cluster
from plait.plan.estimate import Assumptions, Estimate, evaluate
from plait.plan.layouts import parse_layout
from plait.plan.memory import PRECISIONS
from plait.plan.search import rank_layouts

DEFAULT_TOKENS_PER_BATCH = 4 * 2**20  # plan presets without a batch: about 4M tokens per step


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # bad flags are bad user input: one line, exit status 2
        raise ConfigError(f"plait plan: {message}")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="plait plan", description="Predict memory and speed of parallel layouts.")
    p.add_argument("--model", help="plan preset, plait preset or TOML config")
    p.add_argument("--gpus", type=int, help="number of devices")
    p.add_argument("--cluster", default="h100-sxm", help="cluster preset or TOML (default h100-sxm)")
    p.add_argument("--global-batch", type=int, help="sequences per optimizer step")
    p.add_argument("--seq-len", type=int, help="sequence length (overrides the model's)")
    p.add_argument("--top", type=int, default=10, help="how many layouts to list")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--set", action="append", default=[], metavar="model.KEY=VALUE", help="override a model field")
    p.add_argument("--layout", help="evaluate exactly this layout, e.g. tp=8,pp=4,zero=1")
    p.add_argument("--explain", metavar="LAYOUT", help="print one layout's breakdown and inputs")
    p.add_argument("--precision", choices=sorted(PRECISIONS), help="bytes per parameter for weights/grads/optimizer")
    p.add_argument("--calibrate", nargs="+", metavar="RUN_DIR", help="fit parameters to plait runs")
    return p


def resolve_model(name: str | None, overrides: list[str]) -> tuple[models.ModelSpec, int | None, str]:
    """The model spec, the config's global batch (None for plan presets) and a precision name."""
    if name in models.PRESETS:
        spec = models.PRESETS[name]
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep or not key.startswith("model."):
                raise ConfigError(f"--set '{item}' must look like model.field=value for plan preset '{name}'")
            spec = models.override(spec, key.strip(), value.strip())
        return spec, None, "bf16"
    if name is None:
        if not overrides:
            raise ConfigError("--model is required (a plan preset, a plait preset or a TOML config)")
        cfg = config_from_dict({"name": "custom"})
        for item in overrides:
            apply_override(cfg, item)
    else:
        try:
            cfg = load_config(name, overrides)
        except ConfigError as exc:
            raise ConfigError(f"--model {name!r}: {exc} (plan presets: {', '.join(models.PRESETS)})") from None
    precision = "fp32" if cfg.train.dtype == "fp32" else "bf16"
    return models.from_plait_model(cfg.model, cfg.name), cfg.train.global_batch, precision


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    cluster = load_cluster(args.cluster)
    if args.calibrate:
        report = calibrate(args.calibrate, cluster)
        print(json.dumps(report, indent=2) if args.json else _calibration_text(report))
        return 0
    spec, config_batch, precision = resolve_model(args.model, args.set)
    if args.seq_len is not None:
        spec = dataclasses.replace(spec, seq_len=args.seq_len)
    models.check_spec(spec)
    if args.gpus is None or args.gpus < 1:
        raise ConfigError("--gpus must be given as a positive integer")
    if args.top < 1:
        raise ConfigError(f"--top={args.top} must be at least 1")
    check_capacity(cluster, args.gpus)
    global_batch = args.global_batch or config_batch or max(1, DEFAULT_TOKENS_PER_BATCH // spec.seq_len)
    if global_batch < 1:
        raise ConfigError(f"--global-batch={global_batch} must be at least 1")
    assumptions = Assumptions(precision=PRECISIONS[args.precision or precision])

    if args.layout or args.explain:
        layout = parse_layout(args.layout or args.explain, args.gpus)
        if layout.world_size != args.gpus:
            raise ConfigError(f"--layout tp x pp x dp x cp = {layout.world_size} but --gpus is {args.gpus}")
        estimate = evaluate(spec, cluster, layout, global_batch, assumptions)
        if args.json:
            print(json.dumps(estimate.to_json(), indent=2))
        else:
            print(_explain_text(spec, cluster.name, global_batch, estimate))
        return 0

    top, considered, fitting = rank_layouts(spec, cluster, args.gpus, global_batch, args.top, assumptions)
    if args.json:
        print(json.dumps([e.to_json() for e in top], indent=2))
        return 0
    _print_table(spec, cluster.name, args.gpus, global_batch, top, considered, fitting)
    return 0


def _print_table(spec: models.ModelSpec, cluster: str, gpus: int, batch: int, top: list[Estimate],
                 considered: int, fitting: int) -> None:
    title = (f"{spec.name} ({spec.n_params() / 1e9:.2f}B) on {gpus} x {cluster}, batch {batch} x {spec.seq_len}: "
             f"{fitting} of {considered} layouts fit")
    table = Table(title=title)
    for column in ("#", "tp", "pp", "dp", "cp", "ep", "zero", "mb", "schedule", "rc", "sp",
                   "mem GB (p/g/o/act)", "step s", "compute", "bubble", "tp/cp/ep/pp/dp comm s",
                   "tok/s/GPU", "TFLOP/s", "MFU"):
        table.add_column(column, justify="right")
    for i, e in enumerate(top, 1):
        lay, m, t = e.layout, e.memory_bytes, e.time_s
        schedule = lay.schedule + (f"x{lay.virtual_stages}" if lay.schedule == "interleaved" else "")
        table.add_row(
            str(i), str(lay.tp), str(lay.pp), str(lay.dp), str(lay.cp), str(lay.ep), str(lay.zero),
            str(lay.micro_batch), schedule, lay.recompute, "y" if lay.sequence_parallel else "n",
            f"{m['total'] / GB:.1f} ({m['params'] / GB:.1f}/{m['grads'] / GB:.1f}/{m['optimizer'] / GB:.1f}/{m['activations'] / GB:.1f})",
            f"{e.step_time_s:.3f}", f"{t['compute']:.3f}", f"{t['bubble']:.3f}",
            "/".join(f"{t[k]:.3f}" for k in ("tp", "cp", "ep", "pp", "dp")),
            f"{e.tokens_per_s_per_gpu:,.0f}", f"{e.tflops_per_gpu:.0f}", f"{e.mfu:.1%}" if e.mfu is not None else "-",
        )
    Console(width=max(200, Console().width)).print(table)
    if not top:
        print("no layout fits: try more GPUs, a smaller micro-batch or --precision, or a larger device")


def _explain_text(spec: models.ModelSpec, cluster: str, batch: int, e: Estimate) -> str:
    lines = [f"{spec.name} on {e.layout.world_size} x {cluster}, global batch {batch} x {spec.seq_len}",
             f"layout: {e.layout.short()}", f"fits: {'yes' if e.fits else 'no'}"]
    if e.why:
        lines.append(f"why: {e.why}")
    if e.memory_bytes:
        lines.append("memory per device (fullest stage):")
        lines += [f"  {k:12s} {v / GB:10.2f} GB" for k, v in e.memory_bytes.items()]
    if e.step_time_s is not None:
        lines.append(f"step time {e.step_time_s:.4f} s:")
        lines += [f"  {k:12s} {v:10.4f} s" for k, v in e.time_s.items()]
        mfu = f"{e.mfu:.1%}" if e.mfu is not None else "n/a (unknown peak)"
        lines.append(f"tokens/s/GPU {e.tokens_per_s_per_gpu:,.0f}   TFLOP/s/GPU (executed) {e.tflops_per_gpu:.1f}   MFU {mfu}")
        lines.append("inputs:")
        lines += [f"  {k:34s} {v:.6g}" if isinstance(v, float) else f"  {k:34s} {v}" for k, v in e.inputs.items()]
    return "\n".join(lines)


def _calibration_text(report: dict) -> str:
    fitted = ", ".join(f"{k}={v:.4g}" for k, v in report["fitted"].items())
    lines = [f"fitted against {report['cluster']}: {fitted}"]
    for run in report["runs"]:
        lines.append(run["run"])
        for key, predicted in run["predicted"].items():
            measured = run["measured"].get(key)
            error = run["relative_error"].get(key)
            err = f"{error:+.1%}" if error is not None else "n/a"
            lines.append(f"  {key:12s} predicted {predicted:14.6g}  measured {measured if measured is not None else 'n/a':>14}  {err}")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m plait.plan.cli ...
    try:
        sys.exit(main(sys.argv[1:]))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
