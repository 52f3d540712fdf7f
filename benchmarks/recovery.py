"""What faults cost in restart and elastic mode, and what resilience costs a healthy run.

Every run is `plait train` on the shortened tiny preset through the elastic launcher (gloo,
one thread per rank), so this measures what a user gets:

- recovery: one run rehearses a crash (rank 2) and a hang (rank 1); from its events.jsonl,
  each fault's detection latency (from the moment it was injected to the monitor naming the
  rank) and time to recover (from detection to training resumed from the snapshot), steps
  redone, and the largest loss difference to the healthy run at any step;
- elastic mode: the same two faults with resilience.mode=elastic (shrink in place, then a
  replacement grows the group back): detection latency, time to recover, steps redone, world
  sizes, the grow steps, and the loss difference to a healthy run of the same batch;
- overhead, in one 4-process job (so that machine noise, which varies between runs by more
  than the effect measured, hits all alike): blocks of `--block` steps rotate between plain
  steps, steps with the watchdog (its per-collective bookkeeping and its heartbeat thread
  publishing to a TCPStore), and steps with the watchdog and one in-memory snapshot per block
  (the gather on the critical path, the write to shared memory in a background thread on the
  same cores), i.e. snapshot_every = block. The figures are the ratios of the median block
  times to the plain blocks', target <= 1.03;
- no alarm: healthy `--steps`-step runs in restart mode, with the launcher's monitor;
- two nodes (`--two-nodes`, on by default; `--only-two-nodes` alone): two simulated nodes of
  2 processes, each its own torchrun agent (plait-c10d rendezvous on 127.0.0.1): rank 3
  crashes; in a second run node-b's agent and workers are killed; in a third, node-b is killed
  and then started again, and the job grows back. Per case the fault's kind, culprit, host and
  collateral, detection latency, time to recover, steps redone, world size before and after
  (and for the return, the time from the group's stop to training at world 4 and the steps
  redone), and the largest loss difference to a fault-free 4-process run.

Prints one JSON object.

    python benchmarks/recovery.py [--nproc 4] [--steps 100] [--block 25] [--pairs 6] [--no-two-nodes]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from plait.resilience.rehearsal import SimulatedNodes

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


def overhead_worker(rank: int, world: int, store_path: str, block: int, pairs: int, run_dir: str, queue) -> None:
    """Alternate blocks of plain steps and steps with watchdog + one snapshot; rank 0 reports."""
    import torch.distributed as dist

    from common import init_rank
    from plait.config import load_config
    from plait.resilience.heartbeat import Watchdog
    from plait.resilience.session import Resilience
    from plait.resilience.snapshot import remove_snapshots
    from plait.train.runtime import init_runtime
    from plait.train.trainer import Trainer

    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    init_rank(rank, world, store_path)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False) if rank == 0 else None
    port = [store.port if store else None]
    dist.broadcast_object_list(port, src=0)
    if rank:
        store = dist.TCPStore("127.0.0.1", port[0], is_master=False, wait_for_workers=False)
    steps = block * (3 * pairs + 1)
    cfg = load_config("tiny", BASE + [f"train.steps={steps}", "resilience.mode=restart"])
    resilience = Resilience(cfg, Path(run_dir))
    trainer = Trainer(cfg, Path(run_dir), init_runtime(cfg), hooks=[resilience])
    kinds = ("plain", "watchdog", "watchdog+snapshot")
    blocks: dict[str, list[float]] = {kind: [] for kind in kinds}
    step = 0
    for index in range(-1, len(kinds) * pairs):
        kind = kinds[index % len(kinds)]  # block -1 is a warm-up
        watchdog = Watchdog(store, trainer.comm, rank, world, 0.5, 8) if kind != "plain" else None
        total = 0.0
        for position in range(block):
            step += 1
            started = time.perf_counter()
            local_loss, _, _, activation_bytes = trainer.train_step(step)
            trainer._gather_step_stats(local_loss, activation_bytes)
            trainer.state.step = step
            if watchdog is not None:
                watchdog.end_step(step, time.perf_counter() - started)
                if position == 0 and kind == "watchdog+snapshot":  # its write overlaps this block
                    resilience.snapshot(trainer)
            total += time.perf_counter() - started
        if watchdog is not None:
            resilience._collect_writer(trainer.log, wait=True)
            watchdog.stop("done")
            trainer.comm.observers.remove(watchdog._on_collective)
        if index >= 0:
            blocks[kind].append(total)
    remove_snapshots(resilience.root)
    trainer.close()
    if rank == 0:
        queue.put(blocks)


def measure_overhead(nproc: int, block: int, pairs: int) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    from common import run_world

    with tempfile.TemporaryDirectory() as tmp:
        blocks = run_world(overhead_worker, nproc, block, pairs, tmp)
    plain = statistics.median(blocks["plain"])
    out = {"block_steps": block, "blocks_each": pairs, "target": 1.03}
    for kind, times in blocks.items():
        out[f"{kind}_block_s"] = [round(t, 3) for t in times]
        if kind != "plain":
            # Also each block against the plain block of its own round: robust to slow drifts.
            rounds = [t / p for t, p in zip(times, blocks["plain"])]
            out[f"{kind}_ratio"] = round(statistics.median(times) / plain, 4)
            out[f"{kind}_ratio_per_round_median"] = round(statistics.median(rounds), 4)
    return out


def measure_elastic(nproc: int, steps: int, snapshot_every: int) -> dict:
    """The same crash and hang in resilience.mode=elastic: the survivors shrink in place, a
    replacement grows the group back. Global batch 24 of micro-batches 2, so that dp 3 and 4
    both keep it (16 of 4 would fall back to restart mode)."""
    batch = ["train.global_batch=24", "train.micro_batch=2", f"train.steps={steps}",
             f"resilience.snapshot_every={snapshot_every}", f"parallel.timeout_s={TIMEOUT_S}"]
    faults = f"crash@rank=2,step={steps // 4}; hang@rank=1,step={steps // 2}"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train(root / "healthy", nproc, batch + ["resilience.mode=none"])
        reference = [r["loss"] for r in read(root / "healthy" / "metrics.jsonl")]
        started = time.perf_counter()
        events = train(root / "elastic", nproc, batch + ["resilience.mode=elastic", f"fault.inject={faults}"])
        wall_s = time.perf_counter() - started
        losses = [r["loss"] for r in read(root / "elastic" / "metrics.jsonl")]
    detected = [e for e in events if e["event"] == "fault_detected" and e["kind"] != "slow"]
    recovered = [e for e in events if e["event"] == "recovered"]
    return {
        "faults": [{
            "kind": d["kind"], "culprit": d["rank"], "detection_latency_s": d["detection_latency_s"],
            "recovery_time_s": r["recovery_time_s"] if r else None,
            "steps_redone": r["steps_redone"] if r else None,
            "world_size": [r["world_size_before"], r["world_size_after"]] if r else None,
        } for d, r in zip(detected, recovered + [None] * (len(detected) - len(recovered)))],
        "grown": [{"at_step": e["resumed_step"], "world_size": [e["world_size_before"], e["world_size_after"]],
                   "state_transfer_s": e["transfer_time_s"]} for e in events if e["event"] == "grown"],
        "fell_back_to_restart": any(e["event"] == "elastic_fallback" for e in events),
        "steps_completed": len(losses),
        "max_loss_delta_vs_healthy": max(abs(a - b) for a, b in zip(losses, reference)) if losses else None,
        "wall_s": round(wall_s, 1),
    }


TWO_NODE_STEPS = 80


def two_node_run(root: Path, plan: str) -> dict:
    """Two simulated nodes x 2 processes (torchrun agents with a c10d rendezvous on 127.0.0.1,
    plait/resilience/rehearsal.py): `crash` (rank 3 crashes at step 20), `node_lost` (node-b's
    agent and workers killed at step 20) or `node_returns` (killed at step 20, started again
    once the job trains on node-a alone)."""
    overrides = BASE + [f"train.steps={TWO_NODE_STEPS}", "model.n_layers=2", "train.global_batch=8",
                        "train.micro_batch=2", "resilience.snapshot_every=2", "resilience.heartbeat_s=0.1",
                        "parallel.timeout_s=20"]
    fault = "slow@rank=0,delay=0.01" + ("; crash@rank=3,step=20" if plan == "crash" else "")
    args = ["train", "--run-dir", str(root / "run")]
    for item in overrides + [f"fault.inject={fault}"]:
        args += ["--set", item]
    nodes = SimulatedNodes(root, ["node-a", "node-b"], nproc_per_node=2, plait_args=args)
    nodes.start_all()
    metrics = root / "run" / "metrics.jsonl"

    def rows() -> int:
        return len(metrics.read_text().splitlines()) if metrics.exists() else 0

    def world_sizes() -> list[int]:
        return [e["world_size"] for e in read(root / "run" / "events.jsonl") if e["event"] == "start"]

    if plan in ("node_lost", "node_returns"):
        while rows() < 20:
            time.sleep(0.2)
        nodes.kill("node-b")
    if plan == "node_returns":
        while world_sizes()[-1:] != [2]:
            time.sleep(0.2)
        shrunk_at = rows()
        while rows() < shrunk_at + 3:
            time.sleep(0.2)
        nodes.start("node-b")
    codes = nodes.wait()
    events = read(root / "run" / "events.jsonl")
    (grown,) = [e for e in events if e["event"] == "grown"] or [{}]
    (detected,) = [e for e in events if e["event"] == "fault_detected" and e["kind"] != "slow"] or [{}]
    (recovered,) = [e for e in events if e["event"] == "recovered"] or [{}]
    steps = [r["step"] for r in read(metrics)]
    return {"agents_exit": codes, "kind": detected.get("kind"), "culprit": detected.get("rank"),
            "host": detected.get("host"), "ranks": detected.get("ranks"), "collateral": detected.get("collateral"),
            "detection_latency_s": detected.get("detection_latency_s"),
            "recovery_time_s": recovered.get("recovery_time_s"), "steps_redone": recovered.get("steps_redone"),
            "resumed_from": recovered.get("source"), "world_before": recovered.get("world_size_before"),
            "world_after": recovered.get("world_size_after"), "steps_completed": len(set(steps)),
            **({"grown": {k: grown.get(k) for k in ("world_size_before", "world_size_after", "hosts_joined",
                                                   "resumed_step", "steps_redone", "transfer_time_s", "source")},
                "world_sizes": world_sizes()} if plan == "node_returns" else {}),
            "losses": [r["loss"] for r in read(metrics)]}


def measure_two_nodes() -> dict:
    """The crash, node-loss and node-return rehearsals, each against a fault-free 4-process run of
    the same dp."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        overrides = [f"train.steps={TWO_NODE_STEPS}", "model.n_layers=2", "train.global_batch=8",
                     "train.micro_batch=2", "resilience.mode=none"]
        train(root / "reference", 4, overrides)
        reference = [r["loss"] for r in read(root / "reference" / "metrics.jsonl")]
        rows = {}
        for plan in ("crash", "node_lost", "node_returns"):
            (root / plan).mkdir()
            row = two_node_run(root / plan, plan)
            losses = row.pop("losses")
            row["max_loss_delta_vs_fault_free"] = (max(abs(a - b) for a, b in zip(losses, reference))
                                                   if len(losses) == len(reference) else None)
            rows[plan] = row
        return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--snapshot-every", type=int, default=25)
    parser.add_argument("--block", type=int, default=25, help="steps per block (one snapshot in each of a kind)")
    parser.add_argument("--pairs", type=int, default=6, help="blocks of each kind")
    parser.add_argument("--two-nodes", action=argparse.BooleanOptionalAction, default=True,
                        help="also rehearse a crash and a node loss on two simulated torchrun nodes")
    parser.add_argument("--only-two-nodes", action="store_true", help="the two-node rows alone")
    args = parser.parse_args()
    if args.only_two_nodes:
        print(json.dumps({"two_nodes": measure_two_nodes()}, indent=1))
        return
    overhead = measure_overhead(args.nproc, args.block, args.pairs)
    steps = [f"train.steps={args.steps}"]
    restart = ["resilience.mode=restart", f"resilience.snapshot_every={args.snapshot_every}"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        healthy = train(root / "healthy", args.nproc, steps + restart)
        alarms = sum(e["event"] == "fault_detected" for e in healthy)
        reference = [r["loss"] for r in read(root / "healthy" / "metrics.jsonl")]
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
        "elastic_mode": measure_elastic(args.nproc, args.steps, args.snapshot_every),
        "two_nodes": measure_two_nodes() if args.two_nodes else None,
        "overhead": overhead,
        "alarms_in_healthy_run": alarms,
    }, indent=1))


if __name__ == "__main__":
    main()
