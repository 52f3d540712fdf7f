"""What checkpoints cost the training step: none, synchronous, and written in the background.

One job of `--nproc` gloo ranks (one thread each) trains one model (the tiny preset widened to
~30M parameters) through plait's Trainer and rotates blocks of `--block` steps between three
modes, so that machine noise hits all alike:

- none: no checkpoint;
- sync: `Trainer.save_checkpoint` every `--every` steps with checkpoint.async_save off (the
  step waits until the checkpoint is committed);
- async: the same with the background writer (the step waits for the staging copy only).

Checkpoints fall after steps 1, 1 + every, ... of each block, so each has `--every` - 1 or more
steps to overlap, as in a long run; an async block then waits for its last one (counted), so
no write spills into the next block. Figures are medians
over the rounds after a warm-up round: step time per mode (block time / steps) and the ratios
to "none"; the seconds a save blocks the step; the seconds a write takes from start to commit
and the bytes written per second (the files of one checkpoint over that time); and, as the
reference, the same state gathered whole (`ParallelModel.full_state()`) and written by rank 0
with one torch.save (fsynced, as DCP's files are). Prints one JSON object.

    python benchmarks/checkpoint.py [--nproc 2] [--block 20] [--every 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from common import init_rank, run_world
from plait.config import load_config
from plait.train.runtime import init_runtime
from plait.train.trainer import Trainer

BASE = ["train.global_batch=8", "train.micro_batch=0", "train.eval_every=0", "train.eval_batches=1",
        "train.sample_tokens=0", "train.threads=1", "train.dtype=fp32", "checkpoint.keep=2",
        "log.tensorboard=false", "log.progress=none", "parallel.zero=1"]
MODEL = ["model.dim=512", "model.n_layers=10", "model.ffn_dim=1536", "model.n_heads=8", "model.n_kv_heads=4",
         "model.seq_len=64"]
MODES = ("none", "sync", "async")


def worker(rank: int, world: int, store_path: str, block: int, every: int, rounds: int, run_dir: str,
           queue) -> None:
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    init_rank(rank, world, store_path)
    steps = block * len(MODES) * (rounds + 1)
    cfg = load_config("tiny", BASE + MODEL + [f"train.steps={steps}", f"checkpoint.every={every}"])
    trainer = Trainer(cfg, Path(run_dir), init_runtime(cfg))
    background = trainer.checkpointer  # async_save is the default: the writer and its group exist
    assert background is not None
    trainer.start()
    block_s: dict[str, list[float]] = {m: [] for m in MODES}
    blocking_s: dict[str, list[float]] = {"sync": [], "async": []}
    step = 0
    for round_index in range(rounds + 1):  # round 0 warms up and is not counted
        for mode in MODES:
            trainer.checkpointer = background if mode == "async" else None
            blocking = []
            dist.barrier()
            started = time.perf_counter()
            for position in range(1, block + 1):
                step += 1
                local_loss, _, _, activation_bytes = trainer.train_step(step)
                trainer._gather_step_stats(local_loss, activation_bytes)  # as fit does every step
                trainer.state.step = step
                if mode != "none" and position % every == 1:
                    save_started = time.perf_counter()
                    trainer.save_checkpoint()
                    blocking.append(time.perf_counter() - save_started)
                trainer._checkpoint_written(wait=False)
            trainer._checkpoint_written(wait=True)
            elapsed = time.perf_counter() - started
            if round_index:
                block_s[mode].append(elapsed)
                if mode != "none":
                    blocking_s[mode] += blocking

    # The reference: the whole state gathered on every rank, rank 0 writes it with torch.save.
    reference = {"gather_s": [], "save_s": [], "bytes": 0}
    whole = Path(run_dir) / "whole_state.pt"
    for _ in range(2):
        dist.barrier()
        started = time.perf_counter()
        params, optim = trainer.parallel.full_state()
        gathered = time.perf_counter()
        if rank == 0:
            with whole.open("wb") as f:
                torch.save({"model": params, "optimizer": optim}, f)
                f.flush()
                os.fsync(f.fileno())
            reference["bytes"] = whole.stat().st_size
            whole.unlink()
        reference["gather_s"].append(gathered - started)
        reference["save_s"].append(time.perf_counter() - gathered)
        del params, optim
    trainer.close()
    if rank == 0:
        events = [json.loads(line) for line in (Path(run_dir) / "events.jsonl").read_text().splitlines()]
        saved = [e for e in events if e["event"] == "checkpoint_saved"]
        newest = Path(saved[-1]["path"])
        checkpoint_bytes = sum(f.stat().st_size for f in newest.iterdir() if f.is_file())
        queue.put({"parameters": trainer.n_params, "block_s": block_s, "blocking_s": blocking_s,
                   "write_s": {"sync": [e["seconds"] for e in saved if not e["background"]],
                               "async": [e["seconds"] for e in saved if e["background"]]},
                   "checkpoint_bytes": checkpoint_bytes, "staging_bytes": background.staging.bytes,
                   "reference": reference})
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--block", type=int, default=20, help="steps per block")
    parser.add_argument("--every", type=int, default=5, help="steps between checkpoints")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three modes after the warm-up")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("PLAIT_CACHE", str(Path(tmp) / "cache"))
        r = run_world(worker, args.nproc, args.block, args.every, args.rounds, str(Path(tmp) / "run"))
    step_s = {m: statistics.median(t) / args.block for m, t in r["block_s"].items()}
    write_s = {m: statistics.median(t) for m, t in r["write_s"].items()}
    ref = r["reference"]
    ref_total = statistics.median(ref["gather_s"]) + statistics.median(ref["save_s"])
    out = {
        "benchmark": "checkpoint", "world_size": args.nproc, "parameters": r["parameters"],
        "block_steps": args.block, "every": args.every, "rounds": args.rounds,
        "checkpoint_bytes": r["checkpoint_bytes"], "staging_bytes_rank0": r["staging_bytes"],
        "step_s": {m: round(s, 4) for m, s in step_s.items()},
        "step_s_per_block": {m: [round(t / args.block, 4) for t in ts] for m, ts in r["block_s"].items()},
        "ratio_to_none": {m: round(step_s[m] / step_s["none"], 4) for m in ("sync", "async")},
        "save_blocks_step_s": {m: round(statistics.median(t), 4) for m, t in r["blocking_s"].items()},
        "write_s": {m: round(s, 4) for m, s in write_s.items()},
        "bytes_per_s": {m: round(r["checkpoint_bytes"] / s) for m, s in write_s.items()},
        "torch_save_full_state": {
            "bytes": ref["bytes"], "gather_s": round(statistics.median(ref["gather_s"]), 4),
            "save_s": round(statistics.median(ref["save_s"]), 4), "total_s": round(ref_total, 4),
            "bytes_per_s": round(ref["bytes"] / ref_total),
        },
        "sync_write_over_torch_save": round(write_s["sync"] / ref_total, 4),
        "target": "ratio_to_none.async <= 1.10",
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
