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
import contextlib
import json
import statistics

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from common import MICRO_BATCH, MODEL, init_rank, make_batches, run_world, timed_steps
from plait.config import OptimConfig
from plait.model import build_model
from plait.comm import Comm, Group
from plait.parallel.zero import ZeroEngine

BUCKET_MB = 25.0  # DDP's default bucket_cap_mb


def worker(rank: int, world: int, store_path: str, steps: int, rounds: int, queue) -> None:
    init_rank(rank, world, store_path)
    group = Group("dp", list(range(world)), rank, dist.group.WORLD)
    plait_model = build_model(MODEL, seed=0)
    optim = OptimConfig(lr=1e-3, weight_decay=0.0)
    engine = ZeroEngine(plait_model, Comm(), group, optim, stage=0, dtype="fp32", reduce_dtype="fp32",
                        bucket_bytes=int(BUCKET_MB * 2**20), device=torch.device("cpu"))
    ddp_model = DistributedDataParallel(build_model(MODEL, seed=0), bucket_cap_mb=BUCKET_MB,
                                        gradient_as_bucket_view=True)
    ddp_opt = torch.optim.AdamW(ddp_model.parameters(), lr=optim.lr, betas=optim.betas, eps=optim.eps,
                                weight_decay=0.0, foreach=True)

    def plait_update():
        engine.step(optim.lr)
        engine.zero_grad()

    def ddp_update():
        ddp_opt.step()
        ddp_opt.zero_grad(set_to_none=False)

    batches = make_batches(steps, rank)
    # plait sums gradients over ranks, so its loss is normalised by the global token count;
    # DDP averages them, so its loss is normalised by the local count. Both then follow the
    # gradient of the global mean loss, and the two models must stay equal.
    local_tokens = MICRO_BATCH * MODEL.seq_len
    global_tokens = local_tokens * world
    plait_times, ddp_times = [], []
    for round_index in range(rounds + 1):  # round 0 warms up both and is not counted
        p = timed_steps(plait_model, batches, global_tokens, lambda: engine.micro_batch(final=True), plait_update)
        d = timed_steps(ddp_model, batches, local_tokens, contextlib.nullcontext, ddp_update)
        if round_index:
            plait_times += p
            ddp_times += d
    drift = max((a - b).abs().max().item() for a, b in zip(plait_model.parameters(), ddp_model.module.parameters()))
    if rank == 0:
        queue.put({"plait_step_s": statistics.median(plait_times), "ddp_step_s": statistics.median(ddp_times),
                   "max_param_difference": drift})
    dist.destroy_process_group()


def measure(world: int, steps: int, rounds: int) -> dict:
    result = run_world(worker, world, steps, rounds)
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
