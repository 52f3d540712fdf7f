"""What faults cost in restart mode, and what resilience costs a healthy run.

Every run is `plait train` on the shortened tiny preset through the elastic launcher (gloo,
one thread per rank), so this measures what a user gets:

- recovery: one run rehearses a crash (rank 2) and a hang (rank 1); from its events.jsonl,
  each fault's detection latency (from the moment it was injected to the monitor naming the
  rank) and time to recover (from detection to training resumed from the snapshot), steps
  redone, and the largest loss difference to the healthy run at any step;
- overhead: healthy runs with resilience.mode=none and =restart (watchdog heartbeats and
  in-memory snapshots every `--snapshot-every` steps) alternate, so machine noise hits both
  alike. A step's cost is its median `step_time_s` (robust to the odd step another process
  slows down; it includes the watchdog's per-collective bookkeeping), plus in restart mode the
  median time a snapshot holds up training (`seconds` of `snapshot_saved` events: the gather;
  the write to shared memory runs in a background thread, `write_seconds`, on the same cores)
  divided by the snapshot interval. The figure
  is the median over pairs of the ratio restart / none, target <= 1.03. The restart-mode runs
  are also the healthy runs that must raise no alarm.

Prints one JSON object.

    python benchmarks/recovery.py [--nproc 4] [--steps 100] [--pairs 3]
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

BASE = ["train.global_batch=16", "train.micro_batch=4", "train.eval_every=0", "train.eval_batches=1",
        "train.sample_tokens=0", "train.threads=1", "checkpoint.every=0", "log.tensorboard=false",
        "log.progress=none"]
TIMEOUT_S = 10


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def train(run_dir: Path, nproc: int, overrides: list[str]) -> list[dict]:
    args = [sys.executable, "-m", "plait", "train", "--nproc", str(nproc), "--run-dir", str(run_dir)]
    for item in BASE + overrides:
        args += ["--set", item]
    result = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if result.returncode != 0:
        raise SystemExit(f"run {run_dir.name} failed:\n{result.stderr[-3000:]}")
    return read(run_dir / "events.jsonl")


def cost_per_step(run_dir: Path, events: list[dict], snapshot_every: int) -> tuple[float, float, float]:
    """(median step time, snapshot time amortised per step, median background write time) of one run."""
    step = statistics.median(r["step_time_s"] for r in read(run_dir / "metrics.jsonl")[5:])  # after warm-up
    snapshots = [e for e in events if e["event"] == "snapshot_saved"]
    if not snapshots:
        return step, 0.0, 0.0
    return (step, statistics.median(e["seconds"] for e in snapshots) / snapshot_every,
            statistics.median(e["write_seconds"] for e in snapshots))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--snapshot-every", type=int, default=10)
    args = parser.parse_args()
    steps = [f"train.steps={args.steps}"]
    restart = ["resilience.mode=restart", f"resilience.snapshot_every={args.snapshot_every}"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ratios, alarms, times, snapshot_costs, writes = [], 0, {"none": [], "restart": []}, [], []
        for pair in range(args.pairs):
            for mode, extra in (("none", ["resilience.mode=none"]), ("restart", restart)):
                events = train(root / f"{mode}-{pair}", args.nproc, steps + extra)
                step, snapshot, write = cost_per_step(root / f"{mode}-{pair}", events, args.snapshot_every)
                times[mode].append(step + snapshot)
                if mode == "restart":
                    snapshot_costs.append(snapshot)
                    writes.append(write)
                alarms += sum(e["event"] == "fault_detected" for e in events)
            ratios.append(times["restart"][-1] / times["none"][-1])
        reference = [r["loss"] for r in read(root / "restart-0" / "metrics.jsonl")]

        faults = f"crash@rank=2,step={args.steps // 4}; hang@rank=1,step={args.steps // 2}"
        faulty = root / "faulty"
        events = train(faulty, args.nproc, steps + restart + [f"fault.inject={faults}",
                                                               f"parallel.timeout_s={TIMEOUT_S}"])
        losses = [r["loss"] for r in read(faulty / "metrics.jsonl")]
        detected = [e for e in events if e["event"] == "fault_detected"]
        recovered = [e for e in events if e["event"] == "recovered"]
    print(json.dumps({
        "nproc": args.nproc, "steps": args.steps, "snapshot_every": args.snapshot_every,
        "restart_mode": [{
            "kind": d["kind"], "culprit": d["rank"], "collective": f"{d['collective']} #{d['seq']} of {d['group']}",
            "detection_latency_s": d["detection_latency_s"],
            "recovery_time_s": r["recovery_time_s"] if r else None,
            "steps_redone": r["steps_redone"] if r else None, "resumed_from": r["source"] if r else None,
        } for d, r in zip(detected, recovered + [None] * (len(detected) - len(recovered)))],
        "hang_timeout_s": TIMEOUT_S,
        "steps_completed": len(losses),
        "max_loss_delta_vs_healthy": max(abs(a - b) for a, b in zip(losses, reference)) if losses else None,
        "elastic_mode": "not yet supported (resilience.mode=elastic is rejected)",
        "overhead": {
            "step_s_none": [round(t, 4) for t in times["none"]],
            "step_s_restart": [round(t, 4) for t in times["restart"]],
            "snapshot_s_per_step": [round(t, 5) for t in snapshot_costs],
            "snapshot_background_write_s": [round(t, 4) for t in writes],
            "ratio_per_pair": [round(r, 4) for r in ratios],
            "median_ratio": round(statistics.median(ratios), 4), "target": 1.03,
        },
        "alarms_in_healthy_runs": alarms,
    }, indent=1))


if __name__ == "__main__":
    main()
