"""Bytes communicated against loss reached: every low-communication mode of plait on the same
run (tiny, 4 gloo workers, the same tokens and sample order), launched through `plait train`.

Prints one JSON line per mode and a summary; `bytes_per_token_vs_every_step` is the mode's
metered traffic (metrics' comm_bytes, the largest of any rank, summed over steps) relative to
every-step data parallelism measured in the same run. Also draws every loss curve on one
figure with `plait plot`.

    python benchmarks/lowcomm.py [--steps 200] [--nproc 4] [--out runs/lowcomm]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

MODES = {
    "every_step": [],
    "diloco_h10": ["train.sync=diloco", "sync.inner_steps=10"],
    "diloco_h50": ["train.sync=diloco", "sync.inner_steps=50"],
    "noloco_h10": ["train.sync=noloco", "sync.inner_steps=10", "sync.outer_momentum=0.5"],
    "co2_h10": ["train.sync=co2", "sync.inner_steps=10", "sync.outer_lr=1.0", "sync.outer_momentum=0"],
    "powersgd_r2": ["parallel.grad_compression=powersgd", "compression.rank=2"],
    "powersgd_r8": ["parallel.grad_compression=powersgd", "compression.rank=8"],
    "adaptive_r4": ["parallel.grad_compression=adaptive", "compression.rank=4", "compression.adjust_every=50"],
    "galore_r32": ["optim.name=galore", "optim.rank=32", "optim.update_proj_gap=50"],
}


def run_mode(name: str, overrides: list[str], args: argparse.Namespace) -> dict:
    run_dir = Path(args.out) / name
    common = [f"train.steps={args.steps}", "train.eval_every=0", "train.sample_tokens=0", "checkpoint.every=0",
              "checkpoint.resume=never", "log.tensorboard=false", "log.progress=none", "train.threads=1"]
    command = [sys.executable, "-m", "plait", "train", "tiny", "--nproc", str(args.nproc), "--run-dir",
               str(run_dir)] + [item for o in common + overrides for item in ("--set", o)]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "mode": name, "steps": len(rows), "tokens": rows[-1]["tokens"],
        "comm_bytes": sum(r["comm_bytes"] for r in rows), "final_loss": rows[-1]["loss"],
        "val_loss": rows[-1]["val_loss"], "train_s": sum(r["step_time_s"] for r in rows), "wall_s": wall,
        "run_dir": str(run_dir),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--out", default="runs/lowcomm")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset (every_step always runs)")
    args = parser.parse_args()
    if Path(args.out).exists() and any(Path(args.out).iterdir()):
        sys.exit(f"{args.out} is not empty; choose another --out")
    chosen = ["every_step"] + [m for m in args.modes.split(",") if m and m != "every_step"]
    unknown = [m for m in chosen if m not in MODES]
    if unknown:
        sys.exit(f"unknown modes {unknown}; choose from {list(MODES)}")
    results = []
    for name in chosen:
        result = run_mode(name, MODES[name], args)
        base = results[0] if results else result
        result["bytes_per_token_vs_every_step"] = (result["comm_bytes"] / result["tokens"]) / (
            base["comm_bytes"] / base["tokens"])
        result["val_loss_gap"] = result["val_loss"] - base["val_loss"]
        results.append(result)
        print(json.dumps(result), flush=True)
    figure = Path(args.out) / "loss_curves.png"
    subprocess.run([sys.executable, "-m", "plait", "plot", *[r["run_dir"] for r in results], "-o", str(figure)],
                   check=True, stdout=subprocess.DEVNULL)
    print(json.dumps({"summary": {r["mode"]: {"bytes_vs_every_step": round(r["bytes_per_token_vs_every_step"], 4),
                                              "val_loss": round(r["val_loss"], 4),
                                              "wall_s": round(r["wall_s"], 1)} for r in results},
                      "figure": str(figure)}))


if __name__ == "__main__":
    main()
