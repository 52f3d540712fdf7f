"""plait's data parallelism against torch's DistributedDataParallel, side by side.

For each world size (2 and 4 gloo processes, one thread each) both wrappers train the
same model on the same batches in one process group. Rounds alternate between the two so
that machine noise hits both alike; the figure is the median step time over all rounds,
and the ratio plait / DDP is what matters (not absolute times). Prints one JSON line per
world size and a summary line.

    python benchmarks/dp_overhead.py [--steps 10] [--rounds 5] [--worlds 2 4]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from plait.config import ModelConfig
from plait.model import build_model
from plait.parallel.comm import Comm, Group
from plait.parallel.data_parallel import DataParallel

MODEL = ModelConfig(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=768, vocab_size=256, seq_len=128)
MICRO_BATCH = 4
BUCKET_MB = 25.0  # DDP's default bucket_cap_mb


def make_batches(steps: int, rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1000 + rank)
    data = torch.randint(0, MODEL.vocab_size, (steps, MICRO_BATCH, MODEL.seq_len + 1), generator=gen)
    return [(d[:, :-1], d[:, 1:]) for d in data]


def timed_steps(model, optimizer, batches, tokens, before_step, after_step) -> list[float]:
    times = []
    for inputs, targets in batches:
        start = time.perf_counter()
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(), reduction="sum") / tokens
        loss.backward()
        before_step()
        optimizer.step()
        after_step()
        times.append(time.perf_counter() - start)
    return times


def worker(rank: int, world: int, store_path: str, steps: int, rounds: int, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    group = Group("dp", list(range(world)), rank, dist.group.WORLD)
    plait_model = build_model(MODEL, seed=0)
    plait_dp = DataParallel(plait_model, Comm(), group, int(BUCKET_MB * 2**20))
    plait_opt = torch.optim.AdamW(plait_model.parameters(), lr=1e-3, foreach=True)
    ddp_model = DistributedDataParallel(build_model(MODEL, seed=0), bucket_cap_mb=BUCKET_MB,
                                        gradient_as_bucket_view=True)
    ddp_opt = torch.optim.AdamW(ddp_model.parameters(), lr=1e-3, foreach=True)
    batches = make_batches(steps, rank)
    # plait sums gradients over ranks, so its loss is normalised by the global token count;
    # DDP averages them, so its loss is normalised by the local count. Both then follow the
    # gradient of the global mean loss, and the two models must stay equal.
    local_tokens = MICRO_BATCH * MODEL.seq_len
    global_tokens = local_tokens * world
    plait_times, ddp_times = [], []
    for round_index in range(rounds + 1):  # round 0 warms up both and is not counted
        p = timed_steps(plait_model, plait_opt, batches, global_tokens,
                        plait_dp.finish_gradient_sync, plait_dp.zero_grad)
        d = timed_steps(ddp_model, ddp_opt, batches, local_tokens,
                        lambda: None, lambda: ddp_opt.zero_grad(set_to_none=False))
        if round_index:
            plait_times += p
            ddp_times += d
    drift = max((a - b).abs().max().item() for a, b in zip(plait_model.parameters(), ddp_model.module.parameters()))
    if rank == 0:
        queue.put({"plait_step_s": statistics.median(plait_times), "ddp_step_s": statistics.median(ddp_times),
                   "max_param_difference": drift})
    dist.destroy_process_group()


def measure(world: int, steps: int, rounds: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(worker, args=(world, os.path.join(tmp, "store"), steps, rounds, queue),
                           nprocs=world, start_method="spawn", join=True)
    result = queue.get(timeout=10)
    n_params = sum(p.numel() for p in build_model(MODEL, seed=0).parameters())
    return {"benchmark": "dp_overhead", "world_size": world, "parameters": n_params,
            "micro_batch": MICRO_BATCH, "seq_len": MODEL.seq_len, **result,
            "ratio": result["plait_step_s"] / result["ddp_step_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    rows = [measure(world, args.steps, args.rounds) for world in args.worlds]
    for row in rows:
        print(json.dumps(row))
    print(json.dumps({"benchmark": "dp_overhead", "summary": {str(r["world_size"]): round(r["ratio"], 3) for r in rows},
                      "target": "ratio <= 1.05"}))


if __name__ == "__main__":
    main()
