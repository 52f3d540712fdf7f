"""Measured pipeline bubble of each schedule against its formula, on 4 gloo processes.

Runs `plait train` (the real command line) with pp = 4 for each schedule, reads `pp_bubble`
(the fraction of each step the stages spent idle, averaged over stages) from metrics.jsonl,
and prints it beside the formula as JSON lines: GPipe and 1F1B (p-1)/(m+p-1), interleaved
with v chunks (p-1)/(v m + p - 1), ZB-H1 about a third of 1F1B's idle time.
On CPU, with four processes sharing the cores, communication and contention add idle time
that the unit-cost formulas leave out; the ordering of the schedules is what to look at.

    python benchmarks/pp_bubble.py [--steps 8] [--microbatches 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PP = 4


def formula(schedule: str, m: int, v: int) -> float:
    p = PP
    if schedule == "interleaved":
        return (p - 1) / (v * m + p - 1)
    if schedule == "zb":  # idle time a third of 1F1B's: (p-1)(F+B-W) of (p-1)(F+B-W) + m(F+B+W)
        return (p - 1) / (3 * m + p - 1)
    return (p - 1) / (m + p - 1)


def measure(schedule: str, steps: int, m: int, run_dir: Path) -> dict:
    v = 2 if schedule == "interleaved" else 1
    overrides = [
        f"train.steps={steps}", f"train.global_batch={m * 2}", "train.micro_batch=2", "model.n_layers=8",
        f"parallel.pp={PP}", f"parallel.pp_schedule={schedule}", f"parallel.pp_virtual_stages={v}",
        "train.eval_every=0", "train.eval_batches=1", "train.sample_tokens=0", "checkpoint.every=0",
        "log.tensorboard=false", "log.progress=none", "train.threads=1",
    ]
    command = [sys.executable, "-m", "plait", "train", "--nproc", str(PP), "--run-dir", str(run_dir)]
    for item in overrides:
        command += ["--set", item]
    subprocess.run(command, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    measured = statistics.median(r["pp_bubble"] for r in rows[2:])  # the first steps warm up
    return {"benchmark": "pp_bubble", "schedule": schedule, "pp": PP, "microbatches": m, "virtual_stages": v,
            "measured_pp_bubble": measured, "formula": formula(schedule, m, v),
            "step_time_s": statistics.median(r["step_time_s"] for r in rows[2:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--microbatches", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for schedule in ("gpipe", "1f1b", "interleaved", "zb"):
            print(json.dumps(measure(schedule, args.steps, args.microbatches, Path(tmp) / schedule)), flush=True)


if __name__ == "__main__":
    main()
