"""`plait plan`: rank layouts for a model on a cluster, evaluate or explain one, or calibrate.

    plait plan --model llama3-70b --gpus 1024 --cluster h100-sxm --top 10
    plait plan --model megatron-1t --gpus 3072 --global-batch 3072 --layout "tp=8,pp=64,..." --json
    plait plan --model llama3-405b --gpus 16384 --global-batch 2048 --layout tp=8,pp=16 --explain
    plait plan --model tiny --gpus 2 --explain "dp=2,micro_batch=8" --exact
    plait plan --calibrate runs/a runs/b --cluster h100-sxm
    plait plan --calibrate measured.json --cluster h200

`--layout` pins the fields it names and searches the others (micro-batch, virtual stages,
schedule, recompute, ZeRO stage, sequence parallel, and any degree left out); `--exact`
evaluates it as written, defaults for the rest.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from rich.console import Console
from rich.table import Table

from plait.errors import ConfigError
from plait.plan import models
from plait.plan.calibrate import calibrate, calibrate_points
from plait.plan.cluster import GB, check_capacity, load_cluster
from plait.plan.estimate import Assumptions, Estimate, evaluate
from plait.plan.layouts import Layout, check_pins, parse_layout, parse_pins
from plait.plan.memory import PRECISIONS
from plait.plan.search import pinned_search, rank_layouts

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
    p.add_argument("--layout", help="pin these fields (e.g. tp=8,pp=16,dp=128) and search the rest")
    p.add_argument("--explain", metavar="LAYOUT", nargs="?", const="",
                   help="print every memory and time term of the chosen layout (optionally pinning LAYOUT)")
    p.add_argument("--exact", action="store_true",
                   help="with --layout/--explain: evaluate the layout as written, defaults for fields left out")
    p.add_argument("--precision", choices=sorted(PRECISIONS), help="bytes per parameter for weights/grads/optimizer")
    p.add_argument("--calibrate", nargs="+", metavar="RUN_DIR_OR_JSON",
                   help="fit efficiency to plait runs, or to a JSON file of measured (shape, tokens/s) points")
    return p


resolve_model = models.resolve_model  # kept here too: it was first public in this module


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    cluster = load_cluster(args.cluster)
    if args.calibrate:
        json_files = [a for a in args.calibrate if a.endswith(".json")]
        if json_files:
            if len(json_files) != 1 or len(args.calibrate) != 1:
                raise ConfigError("--calibrate takes one JSON file of points, or run directories, not both")
            report = calibrate_points(json_files[0], cluster)
            print(json.dumps(report, indent=2) if args.json else _points_text(report))
            return 0
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

    if args.layout is not None or args.explain is not None:
        if args.layout and args.explain:
            raise ConfigError("give the layout once: --layout LAYOUT --explain, or --explain LAYOUT")
        text = args.layout or args.explain or ""
        result = _pinned(spec, cluster, args.gpus, global_batch, text, args.exact, assumptions)
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(_pinned_text(spec, cluster.name, global_batch, result))
        return 0

    top, considered, fitting = rank_layouts(spec, cluster, args.gpus, global_batch, args.top, assumptions)
    if args.json:
        print(json.dumps([e.to_json() for e in top], indent=2))
        return 0
    _print_table(spec, cluster.name, args.gpus, global_batch, top, considered, fitting)
    return 0


def _pinned(spec: models.ModelSpec, cluster, gpus: int, global_batch: int, text: str, exact: bool,
            assumptions: Assumptions) -> dict:
    """The JSON of the chosen layout (an Estimate's fields) plus the search's account: the
    runner-up and why it lost, which fields were searched, how many layouts fit."""
    pins = parse_pins(text)
    check_pins(pins, gpus)
    exact_layout = parse_layout(text, gpus)
    if exact:
        out = evaluate(spec, cluster, exact_layout, global_batch, assumptions).to_json()
        return {**out, "runner_up": None, "runner_up_lost": None, "searched": [],
                "layouts_considered": 1, "layouts_fitting": int(out["fits"])}
    result = pinned_search(spec, cluster, gpus, global_batch, pins, assumptions)
    chosen = result.best or result.closest
    if chosen is None:  # no layout keeps the pins and passes the rules: say which rule, as written
        chosen = evaluate(spec, cluster, exact_layout, global_batch, assumptions)
    return {**chosen.to_json(),
            "runner_up": result.runner_up.to_json() if result.runner_up else None,
            "runner_up_lost": result.runner_up_lost, "searched": result.searched,
            "layouts_considered": result.considered, "layouts_fitting": result.fitting}


def _pinned_text(spec: models.ModelSpec, cluster: str, batch: int, result: dict) -> str:
    e = _estimate_from_json(result)
    lines = [_explain_text(spec, cluster, batch, e)]
    if result["searched"]:
        lines.append(f"searched: {', '.join(result['searched'])} "
                     f"({result['layouts_fitting']} of {result['layouts_considered']} layouts fit)")
    if result["runner_up"]:
        runner = result["runner_up"]
        lines.append(f"runner-up: {Layout(**_layout_fields(runner['layout'])).short()}, "
                     f"step {runner['step_time_s']:.4f} s; lost by {result['runner_up_lost']}")
    return "\n".join(lines)


def _layout_fields(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def _estimate_from_json(d: dict) -> Estimate:
    return Estimate(Layout(**_layout_fields(d["layout"])), d["fits"], d["why"], d["step_time_s"],
                    d["tokens_per_s_per_gpu"], d["tflops_per_gpu"], d["mfu"], d["memory_bytes"], d["time_s"],
                    d["inputs"])


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


def _points_text(report: dict) -> str:
    fitted = ", ".join(f"{k}={v:.4g}" for k, v in report["fitted"].items())
    lines = [f"fitted against {report['cluster']}: {fitted}"]
    for row in report["points"]:
        lines.append(f"  {row['point']:24s} measured {row['measured_tokens_per_s']:12,.0f} tok/s  "
                     f"predicted {row['predicted_before']:12,.0f} ({row['error_before']:+.1%}) -> "
                     f"{row['predicted_after']:12,.0f} ({row['error_after']:+.1%})")
    lines.append("add to your cluster TOML (with accelerator = \"<preset>\" for its other figures):")
    lines.append(report["cluster_toml"].rstrip())
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
